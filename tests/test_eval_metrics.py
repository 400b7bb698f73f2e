"""VisA-D&R metrics agree with scikit-learn / rouge-score, and the edge cases are defined."""
import math

import numpy as np
import pytest
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from aov_dist.eval.metrics import (auroc, binary_scores, detection_metrics, flatten, is_yes, rouge_l,
                                   sbert_cosine)
from aov_dist.eval.report import PUBLISHED_DETECTION, render

# three classes; "pcb" has no positive prediction at all, "fryum" has no anomalous image
CLASSES = ["candle"] * 6 + ["pcb"] * 4 + ["fryum"] * 3
Y_TRUE = [1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]
Y_PRED = [1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0]
SCORES = [0.9, 0.4, 0.8, 0.6, 0.1, 0.3, 0.7, 0.2, 0.5, 0.1, 0.6, 0.2, 0.3]


def _sk(t, p):
    return {"accuracy": accuracy_score(t, p), "precision": precision_score(t, p, zero_division=0),
            "recall": recall_score(t, p, zero_division=0), "f1": f1_score(t, p, zero_division=0)}


def test_yes_rule_is_the_papers():
    assert is_yes("Yes, there is a scratch.") and is_yes("I think yes")
    assert not is_yes("No.") and not is_yes("YES") and not is_yes("")


def test_binary_scores_equal_sklearn_including_zero_division():
    for t, p in [(Y_TRUE, Y_PRED), ([1, 1, 0, 0], [0, 0, 0, 0]), ([0, 0, 0], [1, 0, 0]), ([1, 0], [1, 0])]:
        ours = binary_scores(t, p)
        for k, v in _sk(t, p).items():
            assert ours[k] == pytest.approx(v, abs=1e-12), (t, p, k)


def test_detection_averages_per_class_then_over_classes():
    m = detection_metrics(CLASSES, Y_TRUE, Y_PRED, SCORES)
    idx = {c: [i for i, x in enumerate(CLASSES) if x == c] for c in set(CLASSES)}
    per = {c: _sk([Y_TRUE[i] for i in ix], [Y_PRED[i] for i in ix]) for c, ix in idx.items()}
    assert sorted(m["per_class"]) == ["candle", "fryum", "pcb"]
    # the class with no positive prediction: precision 0 (sklearn zero_division=0), no crash, no NaN
    assert m["per_class"]["pcb"]["precision"] == 0.0 and m["per_class"]["pcb"]["f1"] == 0.0
    for k in ("accuracy", "precision", "recall", "f1"):
        assert m["class_mean"][k] == pytest.approx(np.mean([per[c][k] for c in per]))
        assert m["overall"][k] == pytest.approx(_sk(Y_TRUE, Y_PRED)[k])
    # class mean differs from pooled here, so a swapped implementation would be caught
    assert m["class_mean"]["f1"] != pytest.approx(m["overall"]["f1"])


def test_auroc_equals_sklearn_and_is_none_when_undefined():
    m = detection_metrics(CLASSES, Y_TRUE, Y_PRED, SCORES)
    assert m["overall"]["auroc"] == pytest.approx(roc_auc_score(Y_TRUE, SCORES))
    cand = [i for i, c in enumerate(CLASSES) if c == "candle"]
    assert m["per_class"]["candle"]["auroc"] == pytest.approx(
        roc_auc_score([Y_TRUE[i] for i in cand], [SCORES[i] for i in cand]))
    assert m["per_class"]["fryum"]["auroc"] is None  # only normal images
    defined = [m["per_class"][c]["auroc"] for c in ("candle", "pcb")]
    assert m["class_mean"]["auroc"] == pytest.approx(np.mean(defined))
    assert auroc([1, 1], [0.2, 0.3]) is None


def test_rouge_l_equals_rouge_score():
    preds = ["a small scratch on the left edge", "No defect.", "The candle wick is burnt"]
    refs = ["there is a small scratch near the left edge", "A crack at the bottom.", "the wick is burnt"]
    for stem in (True, False):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)
        expected = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
        assert rouge_l(preds, refs, use_stemmer=stem) == pytest.approx(expected)
    assert rouge_l(["x"], ["x"])[0] == 1.0


def test_sbert_identical_texts_score_one_and_different_less():
    a = ["A crack runs across the capsule.", "The PCB is missing a resistor."]
    same = sbert_cosine(a, a)
    assert same == pytest.approx([1.0, 1.0], abs=1e-5)
    other = sbert_cosine(a, ["The weather is sunny today.", "The PCB lacks one resistor."])
    assert other[0] < 0.5 < other[1] < 1.0


def test_flatten_drops_none_and_prefixes():
    flat = flatten({"detection": {"overall": {"f1": 0.5, "auroc": None, "n": 3}}, "x": float("nan")})
    assert flat == {"eval/detection/overall/f1": 0.5, "eval/detection/overall/n": 3.0}


def test_report_shows_published_rows_and_ours():
    m = {"detection": detection_metrics(CLASSES, Y_TRUE, Y_PRED, SCORES)}
    text = render(m, label="ckpt")
    assert "Anomaly-OV-7B (paper)" in text and "0.86" in text
    assert PUBLISHED_DETECTION["Anomaly-OV-0.5B"] == (0.79, 0.86, 0.83, 0.82)
    ours = next(line for line in text.splitlines() if line.split() and line.split()[0] == "ckpt")
    assert f"{m['detection']['class_mean']['f1']:.3f}" in ours
    assert not math.isnan(m["detection"]["class_mean"]["precision"])
