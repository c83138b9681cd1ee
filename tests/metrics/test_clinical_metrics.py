"""Clinical reporting: a named positive class, its sensitivity/specificity/PPV/NPV and sensitivity at fixed specificity.

Expectations are counted by hand from the confusion matrices and ROC vertices written in the comments.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import logits_predicting

from fastprompt.metrics import compute_metrics, resolve_positive_class, sensitivity_at_specificity


@pytest.mark.parametrize(
    "names, expected",
    [
        (["abnormal", "normal"], "abnormal"),
        (["covid", "normal"], "covid"),
        (["disease", "healthy"], "disease"),
        (["No_Finding", "pneumonia"], "pneumonia"),
        (["no finding", "Effusion"], "Effusion"),
        (["benign", "malignant"], "malignant"),
        (["CONTROL", "case"], "case"),
        (["Negative", "positive"], "positive"),
        (["cat", "dog"], "dog"),  # no recognised negative: index 1
        (["normal", "healthy"], "healthy"),  # both negative: index 1
    ],
)
def test_default_positive_class_is_the_partner_of_a_recognised_negative(names, expected):
    index, line = resolve_positive_class(names)
    assert names[index] == expected
    assert line.startswith(f"positive class: {expected} (") and "--positive-class" in line


def test_the_fallback_line_says_it_took_index_one():
    _, line = resolve_positive_class(["cat", "dog"])
    assert "class index 1" in line


def test_unknown_positive_class_names_the_classes():
    with pytest.raises(ValueError, match=r"'pneumonia' is not one of the classes \['abnormal', 'normal'\]"):
        resolve_positive_class(["abnormal", "normal"], "pneumonia")
    assert resolve_positive_class(["abnormal", "normal"], "normal")[0] == 1


def test_abnormal_normal_headline_metrics_describe_abnormal():
    # classes 0 abnormal, 1 normal; abnormal is positive.
    targets = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    predicted = np.array([0, 0, 1, 0, 0, 1, 1, 1])
    # abnormal: TP 2 (rows 0, 1), FN 1 (row 2), FP 2 (rows 3, 4), TN 3
    result = compute_metrics(
        logits_predicting(predicted, 2), targets, multilabel=False, class_names=["abnormal", "normal"]
    )
    assert result["positive_class"] == "abnormal"
    assert result["confusion_matrix"] == [[2, 1], [2, 3]]
    assert result["sensitivity"] == pytest.approx(2 / 3)
    assert result["specificity"] == pytest.approx(3 / 5)
    assert result["ppv"] == pytest.approx(2 / 4)
    assert result["npv"] == pytest.approx(3 / 4)
    assert list(result["per_class_auc"]) == ["abnormal"]


def test_an_explicit_positive_class_overrides_the_default():
    targets = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    predicted = np.array([0, 0, 1, 0, 0, 1, 1, 1])
    result = compute_metrics(
        logits_predicting(predicted, 2), targets, multilabel=False, class_names=["abnormal", "normal"],
        positive_class="normal",
    )  # fmt: skip
    # normal: TP 3, FN 2, FP 1, TN 2
    assert result["positive_class"] == "normal"
    assert (result["sensitivity"], result["specificity"]) == pytest.approx((3 / 5, 2 / 3))
    assert (result["ppv"], result["npv"]) == pytest.approx((3 / 4, 2 / 4))


def test_multiclass_positive_class_is_one_against_the_rest():
    targets = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = np.array([0, 1, 0, 1, 1, 2, 0, 2, 2])
    names = ["a", "b", "c"]
    result = compute_metrics(logits_predicting(predicted, 3), targets, multilabel=False, class_names=names)
    assert result["positive_class"] is None  # three classes, none named: means
    assert "sensitivity_at_90_specificity" not in result
    result = compute_metrics(
        logits_predicting(predicted, 3), targets, multilabel=False, class_names=names, positive_class="b"
    )
    # b: TP 2, FN 0, FP 1 (row 1), TN 6
    assert result["positive_class"] == "b"
    assert (result["sensitivity"], result["specificity"]) == pytest.approx((1.0, 6 / 7))
    assert (result["ppv"], result["npv"]) == pytest.approx((2 / 3, 1.0))


def test_positive_class_is_refused_for_multilabel():
    with pytest.raises(ValueError, match="single-label"):
        compute_metrics(np.zeros((2, 2)), np.array([[0, 1], [1, 0]]), multilabel=True, positive_class="x")


# 10 negatives scored 0.0, 0.1, ..., 0.9; 4 positives scored 0.95, 0.9 (tied with a negative), 0.55, 0.05.
# ROC vertices as (false positives, true positives), thresholds descending:
# 0.95 -> (0, 1); 0.9 -> (1, 2) (the tie moves both); 0.8 -> (2, 2); ... 0.6 -> (4, 2); 0.55 -> (4, 3); ...
NEGATIVE_SCORES = np.arange(10) / 10
POSITIVE_SCORES = np.array([0.95, 0.9, 0.55, 0.05])


def _roc_data():
    scores = np.concatenate([NEGATIVE_SCORES, POSITIVE_SCORES])
    positive = np.concatenate([np.zeros(10), np.ones(4)])
    return positive, scores


def test_sensitivity_at_specificity_hand_computed_from_the_roc_vertices():
    positive, scores = _roc_data()
    # 90 %: 1 false positive allowed, a vertex (1, 2) lies there: 2/4
    assert sensitivity_at_specificity(positive, scores, 0.90) == pytest.approx(0.5)
    # 95 %: 0.5 false positives: halfway on the tie's diagonal from (0, 1) to (1, 2): 1.5/4
    assert sensitivity_at_specificity(positive, scores, 0.95) == pytest.approx(0.375)
    # 60 %: 4 false positives: the highest vertex at 4 is (4, 3): 3/4
    assert sensitivity_at_specificity(positive, scores, 0.60) == pytest.approx(0.75)
    assert sensitivity_at_specificity(positive, scores, 0.0) == pytest.approx(1.0)


def test_sensitivity_at_specificity_is_nan_without_both_kinds():
    assert np.isnan(sensitivity_at_specificity(np.ones(3), np.arange(3.0), 0.9))
    assert np.isnan(sensitivity_at_specificity(np.zeros(3), np.arange(3.0), 0.9))


def test_compute_metrics_reports_both_operating_points_for_the_positive_class():
    positive, scores = _roc_data()
    # as class 0 = "lesion" scores (positive), class 1 = "normal"; probabilities for from_logits=False
    probs = np.stack([scores, 1 - scores], axis=1)
    targets = np.where(positive == 1, 0, 1)
    result = compute_metrics(probs, targets, multilabel=False, from_logits=False, class_names=["lesion", "normal"])
    assert result["positive_class"] == "lesion"
    assert result["sensitivity_at_90_specificity"] == pytest.approx(0.5)
    assert result["sensitivity_at_95_specificity"] == pytest.approx(0.375)
