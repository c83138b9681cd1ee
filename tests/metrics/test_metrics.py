"""fastprompt.metrics against scikit-learn directly and hand-computed cases."""

import json
import warnings

import numpy as np
import pytest
import torch
from helpers import logits_predicting
from scipy.special import expit, softmax
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

from fastprompt.metrics import (
    SkippedClassWarning,
    accuracy,
    compute_metrics,
    macro_auc,
    mean_average_precision,
    multilabel_auc,
)


def _logits_for(probs: np.ndarray) -> np.ndarray:
    return np.log(probs)


def test_binary_hand_computed_auc_uses_positive_class_score():
    # positive-class probabilities 0.1, 0.4 (negatives) and 0.35, 0.8 (positives): 3 of 4 pairs ordered -> 0.75
    positive = np.array([0.1, 0.4, 0.35, 0.8])
    logits = _logits_for(np.stack([1 - positive, positive], axis=1))
    targets = np.array([0, 0, 1, 1])
    result = compute_metrics(logits, targets, multilabel=False)
    assert result["auc"] == pytest.approx(0.75)
    assert result["acc"] == pytest.approx(0.75)  # 0.35 < 0.5 is the one mistake
    assert result["skipped_classes"] == []
    assert macro_auc(logits, targets) == pytest.approx(0.75)


def test_multiclass_matches_sklearn_ovr_macro():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(60, 4))
    targets = np.concatenate([np.arange(4), rng.integers(0, 4, size=56)])
    result = compute_metrics(logits, targets, multilabel=False, class_names=["a", "b", "c", "d"])
    probs = softmax(logits, axis=1)
    assert result["auc"] == pytest.approx(roc_auc_score(targets, probs, multi_class="ovr", average="macro"))
    assert result["acc"] == pytest.approx(accuracy_score(targets, logits.argmax(1)))
    assert accuracy(logits, targets) == pytest.approx(result["acc"])
    assert set(result["per_class_auc"]) == {"a", "b", "c", "d"}
    assert result["per_class_auc"]["c"] == pytest.approx(roc_auc_score(targets == 2, probs[:, 2]))


def test_multiclass_absent_class_is_skipped_and_reported():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(30, 3))
    targets = rng.integers(0, 2, size=30)  # class 2 never occurs
    with pytest.warns(SkippedClassWarning, match="'2'"):
        result = compute_metrics(logits, targets, multilabel=False)
    probs = softmax(logits, axis=1)
    expected = np.mean([roc_auc_score(targets == c, probs[:, c]) for c in (0, 1)])
    assert result["skipped_classes"] == ["2"]
    assert "2" not in result["per_class_auc"]
    assert result["auc"] == pytest.approx(expected)


def test_binary_with_one_label_value_is_nan_and_reported():
    with pytest.warns(SkippedClassWarning):
        result = compute_metrics(np.zeros((3, 2)), np.array([1, 1, 1]), multilabel=False, class_names=["neg", "pos"])
    assert np.isnan(result["auc"])
    assert result["skipped_classes"] == ["pos"]
    assert result["acc"] == pytest.approx(0.0)  # ties argmax to column 0


def test_multilabel_matches_sklearn_per_class_and_map():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(40, 5))
    targets = (rng.random((40, 5)) < 0.4).astype(int)
    targets[0], targets[1] = 1, 0  # every class has both values
    result = compute_metrics(logits, targets, multilabel=True)
    probs = expit(logits)
    for c in range(5):
        assert result["per_class_auc"][str(c)] == pytest.approx(roc_auc_score(targets[:, c], probs[:, c]))
    assert result["auc"] == pytest.approx(roc_auc_score(targets, probs, average="macro"))
    assert result["map"] == pytest.approx(average_precision_score(targets, probs, average="macro"))
    assert result["acc"] == pytest.approx(accuracy_score(targets, (probs > 0.5).astype(int)))
    assert mean_average_precision(logits, targets) == pytest.approx(result["map"])
    assert multilabel_auc(logits, targets) == result["per_class_auc"]
    json.dumps(result)


def test_multilabel_hand_computed_map_and_exact_match_accuracy():
    probs = np.array([[0.9, 0.2], [0.8, 0.7], [0.7, 0.1], [0.1, 0.6]])
    targets = np.array([[1, 0], [0, 1], [1, 0], [0, 1]])
    # class 0: ranking 1,0,1,0 -> AP = (1/1 + 2/3) / 2; class 1: ranking 1,1,0,0 -> AP = 1
    result = compute_metrics(probs, targets, multilabel=True, from_logits=False)
    assert result["per_class_ap"]["0"] == pytest.approx((1 + 2 / 3) / 2)
    assert result["map"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    # exact match at 0.5: rows 0, 2, 3 correct, row 1 predicts class 0 too
    assert result["acc"] == pytest.approx(0.75)
    assert accuracy(probs, targets, multilabel=True, from_logits=False) == pytest.approx(0.75)
    logit_result = compute_metrics(np.log(probs / (1 - probs)), targets, multilabel=True)
    assert logit_result["map"] == pytest.approx(result["map"])


def test_multilabel_single_value_class_never_borrows_a_neighbours_auc():
    # class 0 AUC = 1.0, class 1 all negative, class 2 all positive, class 3 AUC = 0.0.
    probs = np.array([[0.9, 0.5, 0.5, 0.1], [0.1, 0.5, 0.5, 0.9], [0.8, 0.4, 0.6, 0.2], [0.2, 0.6, 0.4, 0.8]])
    targets = np.array([[1, 0, 1, 1], [0, 0, 1, 0], [1, 0, 1, 1], [0, 0, 1, 0]])
    with pytest.warns(SkippedClassWarning, match=r"\['lung', 'heart'\]"):
        result = compute_metrics(
            probs, targets, multilabel=True, from_logits=False, class_names=["a", "lung", "heart", "b"]
        )
    assert result["skipped_classes"] == ["lung", "heart"]
    assert result["per_class_auc"] == {"a": pytest.approx(1.0), "b": pytest.approx(0.0)}
    assert result["auc"] == pytest.approx(0.5)  # the official bug would give (1 + 1 + 1 + 0) / 4 = 0.75
    assert set(result["per_class_ap"]) == {"a", "b"}


def test_no_warning_when_every_class_is_defined():
    rng = np.random.default_rng(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_metrics(rng.normal(size=(8, 2)), np.array([0, 1] * 4), multilabel=False)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("multilabel", [False, True])
def test_non_finite_scores_raise(bad, multilabel):
    scores = np.zeros((4, 3))
    scores[2, 1] = bad
    targets = np.eye(3, dtype=int)[[0, 1, 2, 0]] if multilabel else np.array([0, 1, 2, 0])
    with pytest.raises(ValueError, match="NaN/inf.*sample 2"):
        compute_metrics(scores, targets, multilabel=multilabel)


@pytest.mark.parametrize(
    ("scores", "targets", "multilabel", "match"),
    [
        (np.zeros((3, 2)), np.array([0, 1, 2]), False, "class indices in"),
        (np.zeros((3, 2)), np.array([[0, 1]] * 3), False, "multilabel=True"),
        (np.zeros((3, 1)), np.array([0, 1, 0]), False, "C >= 2"),
        (np.zeros(3), np.array([0, 1, 0]), False, r"shape \[N, C\]"),
        (np.zeros((3, 2)), np.array([0.5, 1, 0]), False, "fractional"),
        (np.zeros((3, 2)), np.array([[0, 2]] * 3), True, "0/1"),
        (np.zeros((3, 2)), np.array([0, 1, 0]), True, "multi-hot"),
    ],
)
def test_bad_inputs_raise_clear_errors(scores, targets, multilabel, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(scores, targets, multilabel=multilabel)


def test_probabilities_out_of_range_rejected():
    with pytest.raises(ValueError, match="from_logits=True"):
        compute_metrics(np.array([[2.0, -1.0], [0.0, 1.0]]), np.array([0, 1]), multilabel=False, from_logits=False)


def test_torch_tensors_any_float_dtype_are_accepted():
    logits = torch.tensor([[2.0, -1.0], [0.5, 1.5], [-1.0, 1.0], [1.0, 0.0]])
    targets = torch.tensor([0, 1, 1, 1])
    expected = compute_metrics(logits.numpy(), targets.numpy(), multilabel=False)
    assert compute_metrics(logits.requires_grad_(), targets, multilabel=False) == expected
    assert compute_metrics(logits.detach().bfloat16(), targets, multilabel=False)["acc"] == expected["acc"]


def test_extreme_logits_keep_their_order():
    # softmax/sigmoid round all of these to exactly 0.0 for the positive class, which would tie them (AUC 0.5)
    binary = np.array([[0.0, -1000.0], [0.0, -1200.0], [0.0, -900.0], [0.0, -1100.0]])
    targets = np.array([1, 0, 1, 0])
    assert compute_metrics(binary, targets, multilabel=False)["auc"] == pytest.approx(1.0)
    three = np.concatenate([binary, np.full((4, 1), -5000.0)], axis=1)
    with pytest.warns(SkippedClassWarning, match="'c'"):
        per_class = compute_metrics(three, targets, multilabel=False, class_names=["a", "b", "c"])["per_class_auc"]
    assert per_class["b"] == pytest.approx(1.0)
    labels = np.array([[1, 0], [0, 1], [1, 0], [0, 1]])
    logits = np.array([[-800.0, 5.0], [-900.0, 9.0], [-750.0, 1.0], [-950.0, 7.0]])
    result = compute_metrics(logits, labels, multilabel=True)
    assert result["per_class_auc"] == {"0": 1.0, "1": 1.0} and result["map"] == pytest.approx(1.0)
    assert result["acc"] == pytest.approx(0.5)  # every row predicts [0, 1]: rows 1 and 3 match exactly


def test_confusion_matrix_sensitivity_specificity_hand_computed_three_classes():
    targets = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = np.array([0, 1, 0, 1, 1, 2, 0, 2, 2])
    result = compute_metrics(logits_predicting(predicted, 3), targets, multilabel=False, class_names=["a", "b", "c"])
    assert result["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 3]]  # rows: true class, columns: predicted
    # a: TP 2, FN 1, FP 1, TN 5; b: TP 2, FN 0, FP 1, TN 6; c: TP 3, FN 1, FP 0, TN 5
    assert result["per_class_sensitivity"] == pytest.approx({"a": 2 / 3, "b": 1.0, "c": 3 / 4})
    assert result["per_class_specificity"] == pytest.approx({"a": 5 / 6, "b": 6 / 7, "c": 1.0})
    assert result["sensitivity"] == pytest.approx((2 / 3 + 1 + 3 / 4) / 3)
    assert result["specificity"] == pytest.approx((5 / 6 + 6 / 7 + 1) / 3)
    assert set(result["per_class_auc"]) == {"a", "b", "c"}  # per-class AUC by name


def test_binary_sensitivity_and_specificity_are_the_positive_class():
    targets = np.array([0, 0, 0, 1, 1])
    result = compute_metrics(logits_predicting(np.array([0, 1, 0, 1, 0]), 2), targets, multilabel=False)
    assert result["confusion_matrix"] == [[2, 1], [1, 1]]
    assert (result["sensitivity"], result["specificity"]) == pytest.approx((1 / 2, 2 / 3))  # TP 1 FN 1; TN 2 FP 1


def test_multilabel_sensitivity_and_specificity_at_one_half():
    targets = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    probs = np.array([[0.9, 0.8], [0.2, 0.7], [0.1, 0.4], [0.3, 0.1]])  # predicted [[1,1],[0,1],[0,0],[0,0]]
    result = compute_metrics(probs, targets, multilabel=True, from_logits=False, class_names=["x", "y"])
    assert result["per_class_sensitivity"] == pytest.approx({"x": 0.5, "y": 0.5})  # x: TP 1 FN 1; y: TP 1 FN 1
    assert result["per_class_specificity"] == pytest.approx({"x": 1.0, "y": 0.5})  # x: TN 2 FP 0; y: TN 1 FP 1
    assert (result["sensitivity"], result["specificity"]) == pytest.approx((0.5, 0.75))
    assert "confusion_matrix" not in result


def test_a_class_absent_from_the_set_has_no_sensitivity():
    result = compute_metrics(logits_predicting(np.array([0, 1, 0]), 3), np.array([0, 1, 1]), multilabel=False)
    assert np.isnan(result["per_class_sensitivity"]["2"])  # no positives of class 2: undefined, not 0 or 1
    assert result["per_class_specificity"]["2"] == 1.0
    assert result["sensitivity"] == pytest.approx((1.0 + 0.5) / 2)  # the mean over defined classes
