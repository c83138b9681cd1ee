"""Classification metrics on scikit-learn: accuracy, macro one-vs-rest AUC, mAP and per-class multi-label AUC.

Every function takes ``scores`` ``[N, C]`` and ``targets``: class indices ``[N]`` for single-label tasks, 0/1
multi-hot ``[N, C]`` for multi-label tasks (NumPy arrays or torch tensors). Scores are logits by default
(``from_logits=True``, ranked as softmax for single-label and sigmoid for multi-label, computed in log space so
extreme logits keep their order); pass ``from_logits=False`` when they already are probabilities. A class
whose targets hold a single value in the evaluated set has no defined AUC: it is left out of the average,
named in ``skipped_classes`` and reported with a :class:`SkippedClassWarning` — never given another class's
value.

Clinical reporting names a positive class (the disease). For two classes it is chosen by `resolve_positive_class`:
the class given by the user, else the one whose partner is a recognised negative name (normal, healthy, negative,
benign, control, no finding), else class index 1. Headline sensitivity, specificity, PPV and NPV are that class's
(one against the rest), and so are the sensitivities at 90 % and 95 % specificity read off its ROC curve
(`sensitivity_at_specificity`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy.special import log_softmax
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score, roc_curve

NEGATIVE_CLASS_NAMES = frozenset({"normal", "healthy", "negative", "benign", "control", "nofinding"})
"""Class names (lower case, letters and digits only) that mean "no disease": the other class is the positive one."""

SPECIFICITY_POINTS = (0.90, 0.95)
"""Specificities at which `compute_metrics` reports the sensitivity (``sensitivity_at_90_specificity``, ...)."""


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


def _single_label_auc(
    scores: np.ndarray, targets: np.ndarray, names: list[str], positive: int = 1
) -> tuple[dict[str, float], list[str]]:
    if scores.shape[1] == 2:  # binary: one AUC, on the positive-class score
        if targets.min() == targets.max():
            return {}, [names[positive]]
        return {names[positive]: float(roc_auc_score(targets == positive, scores[:, positive]))}, []
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


def predictive_values(tp: np.ndarray, fn: np.ndarray, fp: np.ndarray, tn: np.ndarray) -> tuple:
    """Per class: PPV TP/(TP+FP) (precision), NPV TN/(TN+FN); NaN when nothing was predicted that way."""
    return _rate(tp, tp + fp), _rate(tn, tn + fn)


def _counts_from_confusion(matrix: np.ndarray) -> tuple[np.ndarray, ...]:
    """One-vs-rest (TP, FN, FP, TN) of each class from a single-label confusion matrix."""
    tp = np.diag(matrix).astype(np.float64)
    fn = matrix.sum(axis=1) - tp
    fp = matrix.sum(axis=0) - tp
    tn = matrix.sum() - tp - fn - fp
    return tp, fn, fp, tn


def _normalised(name: str) -> str:
    return "".join(char for char in str(name).lower() if char.isalnum())


def resolve_positive_class(
    class_names: Sequence[str] | None, positive_class: str | int | None = None, *, num_classes: int | None = None
) -> tuple[int | None, str]:
    """The positive class's index and why it was taken (a line for the user), for single-label reporting.

    `positive_class`: a class name (or index). Without one, a two-class task takes the class whose partner is a
    recognised negative (`NEGATIVE_CLASS_NAMES`, case and separators ignored: ``No_Finding`` is ``nofinding``), else
    class index 1; a task with more classes has none (headline metrics are then means over the classes).
    An unknown name raises a ValueError naming the classes.
    """
    if class_names is None and num_classes is None:
        raise ValueError("resolve_positive_class needs class_names or num_classes")
    names = _names(class_names, num_classes if class_names is None else len(class_names))
    if positive_class is not None:
        if isinstance(positive_class, (int, np.integer)) and not isinstance(positive_class, bool):
            if not 0 <= positive_class < len(names):
                raise ValueError(
                    f"positive class index {positive_class} is out of range for {len(names)} classes ({names})"
                )
            index = int(positive_class)
        elif str(positive_class) in names:
            index = names.index(str(positive_class))
        else:
            raise ValueError(
                f"positive class {positive_class!r} is not one of the classes {names}; pass one of these names"
            )
        return index, f"positive class: {names[index]} (chosen by the user)"
    if len(names) != 2:
        return None, f"no positive class ({len(names)} classes): headline metrics are means over the classes"
    negative = [_normalised(name) in NEGATIVE_CLASS_NAMES for name in names]
    if negative.count(True) == 1:
        index = negative.index(False)
        reason = f"{names[1 - index]!r} is a recognised negative class"
    else:
        index = 1
        reason = "class index 1; neither or both class names are a recognised negative such as 'normal'"
    return index, f"positive class: {names[index]} ({reason}; change it with --positive-class NAME)"


def sensitivity_at_specificity(positive: np.ndarray, scores: np.ndarray, specificity: float) -> float:
    """Sensitivity of the ROC curve of (`positive` 0/1, `scores`) at the given specificity; NaN when undefined.

    The ROC's vertices are the (false positive rate, sensitivity) pairs of every score threshold; between two
    vertices the curve is the straight line (what a random choice between the two thresholds achieves). The value
    is the curve's height at false positive rate ``1 - specificity``, the highest vertex when one lies exactly there.
    """
    positive = np.asarray(positive).astype(bool)
    negatives = int((~positive).sum())
    if negatives == 0 or positive.all() or not positive.any():
        return float("nan")
    fpr, tpr, _ = roc_curve(positive, scores)
    false_positives = np.rint(fpr * negatives)  # exact counts: fpr is a count divided by `negatives`
    allowed = (1.0 - specificity) * negatives
    last = int(np.searchsorted(false_positives, allowed + 1e-9, side="right")) - 1  # last vertex within `allowed`
    if last == len(fpr) - 1 or abs(false_positives[last] - allowed) < 1e-9:
        return float(tpr[last])
    x0, x1, y0, y1 = false_positives[last], false_positives[last + 1], tpr[last], tpr[last + 1]
    return float(y0 + (y1 - y0) * (allowed - x0) / (x1 - x0))


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
    positive_class: str | int | None = None,
) -> dict:
    """All metrics of one evaluated set, as a JSON-ready dict.

    Keys: ``acc``, ``auc`` (binary positive-class / macro one-vs-rest / macro over labels), ``per_class_auc``
    (class name -> AUC, evaluated classes only), ``skipped_classes`` (names whose targets hold one value),
    and for multi-label also ``map`` and ``per_class_ap``. ``auc``/``map`` are NaN when no class is defined.
    ``per_class_sensitivity`` / ``per_class_specificity`` (class name -> TP/(TP+FN), TN/(TN+FP), one class against
    the rest; NaN without positives / negatives) at the predicted class (argmax; multi-label: probability 0.5);
    ``ppv`` / ``npv`` likewise (TP/(TP+FP), TN/(TN+FN)). ``positive_class`` names the class that ``sensitivity``,
    ``specificity``, ``ppv``, ``npv`` and ``sensitivity_at_90_specificity`` / ``sensitivity_at_95_specificity`` (from
    its ROC curve, see `sensitivity_at_specificity`) describe: `positive_class` when given (single-label only), else
    for two classes the one `resolve_positive_class` picks; with more classes and none given it is None and the
    headline values are means over the classes (no fixed-specificity values). Multi-label: None, means over labels.
    Single-label also gives ``confusion_matrix`` (rows: true class, columns: predicted class, in class order).
    """
    if multilabel:
        if positive_class is not None:
            raise ValueError(
                f"positive_class={positive_class!r} applies to single-label tasks; a multi-label task reports every "
                "label against its absence (drop positive_class)"
            )
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
        ppv, npv = predictive_values(tp, fn, fp, tn)
        result["positive_class"] = None
        result.update(sensitivity=_nanmean(sensitivity), specificity=_nanmean(specificity))
        result.update(ppv=_nanmean(ppv), npv=_nanmean(npv))
    else:
        scores, targets = _check_single_label(scores, targets)
        names = _names(class_names, scores.shape[1])
        positive, _ = resolve_positive_class(names, positive_class)
        ranked = _ranking_scores(scores, multilabel=False, from_logits=from_logits)
        per_auc, skipped = _single_label_auc(ranked, targets, names, 1 if positive is None else positive)
        predicted = ranked.argmax(axis=1)
        acc = float(accuracy_score(targets, predicted))
        result = {"acc": acc, "auc": _mean(per_auc), "per_class_auc": per_auc}
        matrix = confusion_matrix(targets, predicted, scores.shape[1])
        counts = _counts_from_confusion(matrix)
        sensitivity, specificity = sensitivity_specificity(*counts)
        ppv, npv = predictive_values(*counts)
        result["positive_class"] = None if positive is None else names[positive]
        if positive is not None:  # the named positive class against the rest
            headline = {"sensitivity": sensitivity, "specificity": specificity, "ppv": ppv, "npv": npv}
            result.update({key: float(values[positive]) for key, values in headline.items()})
            for point in SPECIFICITY_POINTS:
                value = sensitivity_at_specificity(targets == positive, ranked[:, positive], point)
                result[f"sensitivity_at_{round(point * 100)}_specificity"] = value
        else:
            result.update(sensitivity=_nanmean(sensitivity), specificity=_nanmean(specificity))
            result.update(ppv=_nanmean(ppv), npv=_nanmean(npv))
        result["confusion_matrix"] = matrix.tolist()
    result["per_class_sensitivity"] = _by_name(sensitivity, names)
    result["per_class_specificity"] = _by_name(specificity, names)
    result["skipped_classes"] = skipped
    _warn_skipped(skipped, "AUC" + ("/mAP" if multilabel else ""))
    return result
