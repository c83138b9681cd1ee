"""Classification metrics on scikit-learn: accuracy, macro one-vs-rest AUC, mAP and per-class multi-label AUC.

Every function takes ``scores`` ``[N, C]`` and ``targets``: class indices ``[N]`` for single-label tasks, 0/1
multi-hot ``[N, C]`` for multi-label tasks (NumPy arrays or torch tensors). Scores are logits by default
(``from_logits=True``, ranked as softmax for single-label and sigmoid for multi-label, computed in log space so
extreme logits keep their order); pass ``from_logits=False`` when they already are probabilities. A class
whose targets hold a single value in the evaluated set has no defined AUC: it is left out of the average,
named in ``skipped_classes`` and reported with a :class:`SkippedClassWarning` — never given another class's
value.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy.special import log_softmax
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score


class SkippedClassWarning(UserWarning):
    """A class was left out of an AUC/AP average because its targets hold a single value."""


def _numpy(values) -> np.ndarray:
    """Arrays, lists or torch tensors (any device, any float dtype, bf16 included) as a NumPy array."""
    if hasattr(values, "detach"):
        values = values.detach().cpu()
        values = values.float() if values.is_floating_point() else values
        return values.numpy()
    return np.asarray(values)


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = _numpy(scores).astype(np.float64)
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(
            f"scores must have shape [N, C] with N >= 1 samples and C >= 1 classes, got {scores.shape}; "
            "stack the model outputs of the evaluated set into one 2-D array"
        )
    bad = ~np.isfinite(scores)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(
            f"scores contain {int(bad.sum())} NaN/inf values (first in sample {row}); the model diverged or "
            "its outputs overflowed — check the loss and the learning rate before evaluating"
        )
    return scores


def _check_single_label(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = _check_scores(scores)
    targets = _numpy(targets)
    if scores.shape[1] < 2:
        raise ValueError(
            f"single-label scores need one column per class (C >= 2), got {scores.shape}; a binary task "
            "takes two columns (negative, positive)"
        )
    if targets.shape != (scores.shape[0],):
        raise ValueError(
            f"single-label targets must be class indices of shape [{scores.shape[0]}], got {targets.shape}; "
            "for multi-hot targets pass multilabel=True"
        )
    if not np.issubdtype(targets.dtype, np.integer):
        if not np.all(np.equal(np.mod(targets, 1), 0)):
            raise ValueError("single-label targets must be integer class indices, got fractional values")
        targets = targets.astype(np.int64)
    if targets.min() < 0 or targets.max() >= scores.shape[1]:
        raise ValueError(
            f"targets hold class indices in [{targets.min()}, {targets.max()}] but scores have "
            f"{scores.shape[1]} columns; the class list of the model and of the data disagree"
        )
    return scores, targets


def _check_multilabel(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = _check_scores(scores)
    targets = _numpy(targets)
    if targets.shape != scores.shape:
        raise ValueError(
            f"multi-label targets must be multi-hot with the shape of scores {scores.shape}, got {targets.shape}"
        )
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("multi-label targets must be 0/1; threshold soft labels before evaluating")
    return scores, targets.astype(np.int64)


def _ranking_scores(scores: np.ndarray, *, multilabel: bool, from_logits: bool) -> np.ndarray:
    """Per-class scores ordered like the probabilities, without their underflow at extreme logits.

    AUC and AP depend only on the order of each class's scores, so logits are ranked as log-softmax
    (single-label) or as they are (multi-label: sigmoid is monotone); softmax/sigmoid would round distinct
    extreme logits to the same 0.0 and tie them.
    """
    if from_logits:
        return scores if multilabel else log_softmax(scores, axis=1)
    if scores.min() < 0 or scores.max() > 1:
        raise ValueError("from_logits=False needs probabilities in [0, 1]; pass logits with from_logits=True")
    return scores


def _predict_labels(scores: np.ndarray, *, from_logits: bool) -> np.ndarray:
    """Multi-label predictions at probability 0.5 (logit 0)."""
    return (scores > (0.0 if from_logits else 0.5)).astype(np.int64)


def _names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"got {len(class_names)} class names for {num_classes} score columns")
    return [str(name) for name in class_names]


def _per_class(metric, scores: np.ndarray, onehot: np.ndarray, names: list[str]) -> tuple[dict[str, float], list[str]]:
    """Apply a binary sklearn metric column by column; classes with a single target value are skipped."""
    values: dict[str, float] = {}
    skipped: list[str] = []
    for c, name in enumerate(names):
        column = onehot[:, c]
        if column.min() == column.max():
            skipped.append(name)
            continue
        values[name] = float(metric(column, scores[:, c]))
    return values, skipped


def _warn_skipped(skipped: list[str], what: str) -> None:
    if skipped:
        warnings.warn(
            f"{what}: class(es) {skipped} have a single target value in the evaluated set and were left out "
            "of the average; evaluate on a set holding positives and negatives of every class",
            SkippedClassWarning,
            stacklevel=3,
        )


def _mean(values: dict[str, float]) -> float:
    return float(np.mean(list(values.values()))) if values else float("nan")


def _single_label_auc(scores: np.ndarray, targets: np.ndarray, names: list[str]) -> tuple[dict[str, float], list[str]]:
    if scores.shape[1] == 2:  # binary: one AUC, on the positive-class score
        if targets.min() == targets.max():
            return {}, [names[1]]
        return {names[1]: float(roc_auc_score(targets, scores[:, 1]))}, []
    onehot = np.eye(scores.shape[1], dtype=np.int64)[targets]
    return _per_class(roc_auc_score, scores, onehot, names)


def confusion_matrix(targets: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """`[C, C]` counts: row = true class, column = predicted class."""
    targets, predicted = _numpy(targets).astype(np.int64), _numpy(predicted).astype(np.int64)
    return np.bincount(targets * num_classes + predicted, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def _rate(hits: np.ndarray, total: np.ndarray) -> np.ndarray:
    """hits / total per class; NaN where the class has no cases of that kind."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, hits / np.maximum(total, 1), np.nan)


def sensitivity_specificity(tp: np.ndarray, fn: np.ndarray, fp: np.ndarray, tn: np.ndarray) -> tuple:
    """Per class: sensitivity TP/(TP+FN) (recall of the class), specificity TN/(TN+FP); NaN when undefined."""
    return _rate(tp, tp + fn), _rate(tn, tn + fp)


def _rates_from_confusion(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest sensitivity and specificity of each class from a single-label confusion matrix."""
    tp = np.diag(matrix).astype(np.float64)
    fn = matrix.sum(axis=1) - tp
    fp = matrix.sum(axis=0) - tp
    tn = matrix.sum() - tp - fn - fp
    return sensitivity_specificity(tp, fn, fp, tn)


def _by_name(values: np.ndarray, names: list[str]) -> dict[str, float]:
    return {name: float(value) for name, value in zip(names, values)}


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def accuracy(scores: np.ndarray, targets: np.ndarray, *, multilabel: bool = False, from_logits: bool = True) -> float:
    """Top-1 accuracy (argmax), or for multi-label the exact-match accuracy at probability 0.5."""
    if multilabel:
        scores, targets = _check_multilabel(scores, targets)
        ranked = _ranking_scores(scores, multilabel=True, from_logits=from_logits)
        return float(accuracy_score(targets, _predict_labels(ranked, from_logits=from_logits)))
    scores, targets = _check_single_label(scores, targets)
    return float(accuracy_score(targets, scores.argmax(axis=1)))


def macro_auc(
    scores: np.ndarray, targets: np.ndarray, *, from_logits: bool = True, class_names: Sequence[str] | None = None
) -> float:
    """Single-label AUC: the positive-class AUC for 2 classes, else macro one-vs-rest; NaN when undefined."""
    scores, targets = _check_single_label(scores, targets)
    ranked = _ranking_scores(scores, multilabel=False, from_logits=from_logits)
    values, skipped = _single_label_auc(ranked, targets, _names(class_names, scores.shape[1]))
    _warn_skipped(skipped, "AUC")
    return _mean(values)


def multilabel_auc(
    scores: np.ndarray, targets: np.ndarray, *, from_logits: bool = True, class_names: Sequence[str] | None = None
) -> dict[str, float]:
    """Per-class AUC of a multi-label task, keyed by class name; single-value classes are absent (and warned)."""
    scores, targets = _check_multilabel(scores, targets)
    ranked = _ranking_scores(scores, multilabel=True, from_logits=from_logits)
    values, skipped = _per_class(roc_auc_score, ranked, targets, _names(class_names, scores.shape[1]))
    _warn_skipped(skipped, "AUC")
    return values


def mean_average_precision(
    scores: np.ndarray, targets: np.ndarray, *, from_logits: bool = True, class_names: Sequence[str] | None = None
) -> float:
    """Mean over classes of sklearn's average precision (multi-label); single-value classes are skipped."""
    scores, targets = _check_multilabel(scores, targets)
    ranked = _ranking_scores(scores, multilabel=True, from_logits=from_logits)
    values, skipped = _per_class(average_precision_score, ranked, targets, _names(class_names, scores.shape[1]))
    _warn_skipped(skipped, "mAP")
    return _mean(values)


def compute_metrics(
    scores: np.ndarray,
    targets: np.ndarray,
    *,
    multilabel: bool,
    from_logits: bool = True,
    class_names: Sequence[str] | None = None,
) -> dict:
    """All metrics of one evaluated set, as a JSON-ready dict.

    Keys: ``acc``, ``auc`` (binary positive-class / macro one-vs-rest / macro over labels), ``per_class_auc``
    (class name -> AUC, evaluated classes only), ``skipped_classes`` (names whose targets hold one value),
    and for multi-label also ``map`` and ``per_class_ap``. ``auc``/``map`` are NaN when no class is defined.
    ``per_class_sensitivity`` / ``per_class_specificity`` (class name -> TP/(TP+FN), TN/(TN+FP), one class against
    the rest; NaN without positives / negatives) at the predicted class (argmax; multi-label: probability 0.5);
    ``sensitivity`` / ``specificity`` are the positive class's for a binary task, else the mean over classes.
    Single-label also gives ``confusion_matrix`` (rows: true class, columns: predicted class, in class order).
    """
    if multilabel:
        scores, targets = _check_multilabel(scores, targets)
        names = _names(class_names, scores.shape[1])
        ranked = _ranking_scores(scores, multilabel=True, from_logits=from_logits)
        per_auc, skipped = _per_class(roc_auc_score, ranked, targets, names)
        per_ap, _ = _per_class(average_precision_score, ranked, targets, names)
        predicted = _predict_labels(ranked, from_logits=from_logits)
        acc = float(accuracy_score(targets, predicted))
        result = {"acc": acc, "auc": _mean(per_auc), "map": _mean(per_ap), "per_class_auc": per_auc}
        result["per_class_ap"] = per_ap
        tp, fn = (predicted & targets).sum(0), ((1 - predicted) & targets).sum(0)
        fp, tn = (predicted & (1 - targets)).sum(0), ((1 - predicted) & (1 - targets)).sum(0)
        sensitivity, specificity = sensitivity_specificity(tp, fn, fp, tn)
        result.update(sensitivity=_nanmean(sensitivity), specificity=_nanmean(specificity))
    else:
        scores, targets = _check_single_label(scores, targets)
        names = _names(class_names, scores.shape[1])
        ranked = _ranking_scores(scores, multilabel=False, from_logits=from_logits)
        per_auc, skipped = _single_label_auc(ranked, targets, names)
        predicted = ranked.argmax(axis=1)
        acc = float(accuracy_score(targets, predicted))
        result = {"acc": acc, "auc": _mean(per_auc), "per_class_auc": per_auc}
        matrix = confusion_matrix(targets, predicted, scores.shape[1])
        sensitivity, specificity = _rates_from_confusion(matrix)
        if scores.shape[1] == 2:  # binary: the positive class's (class 1) sensitivity and specificity
            result.update(sensitivity=float(sensitivity[1]), specificity=float(specificity[1]))
        else:
            result.update(sensitivity=_nanmean(sensitivity), specificity=_nanmean(specificity))
        result["confusion_matrix"] = matrix.tolist()
    result["per_class_sensitivity"] = _by_name(sensitivity, names)
    result["per_class_specificity"] = _by_name(specificity, names)
    result["skipped_classes"] = skipped
    _warn_skipped(skipped, "AUC" + ("/mAP" if multilabel else ""))
    return result
