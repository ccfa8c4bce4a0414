"""Clinical-efficacy metrics of data.py: the report labeler against the phantom's own labels, and CE scores
against counts worked out by hand."""
import itertools

import numpy as np
import pytest

import data


def test_labeler_exact_on_500_synthetic_reports_across_splits():
    patients = [data.sample_patient(seed, split, i) for seed, split, i in
                itertools.product((0, 3), ("train", "val", "test"), range(90))]  # 540 patients
    got = data.report_labels([data.make_report(p) for p in patients])
    want = np.array([p["labels"] for p in patients])
    assert got.shape == (540, 18) and got.dtype.kind == "i"
    assert (got == want).all(), np.argwhere(got != want)[:5]
    assert 0 < want.mean() < 0.5 and want.sum(0).min() > 0  # every finding occurs, positive and negative


def test_every_template_sentence_alone():
    """Each normal sentence (every paraphrase, every negation) reads as nothing; each abnormal paraphrase, in every
    side/severity/kind, reads as its own finding and only it."""
    for k, label in enumerate(data.LABELS):
        normal, abnormal = data._SENTENCES[label]
        for s in normal:
            assert data.report_labels([s]).sum() == 0, s
        for s, side, sev, kind in itertools.product(abnormal, ("right", "left", "bilateral"), ("mild", "severe"),
                                                    ("central venous catheter", "sternotomy wires", "pacemaker lead")):
            text = s.format(**data._phrases(dict(side=side, lobe="upper", severity=sev, size=12, kind=kind)))
            want = np.eye(18, dtype=int)[k]
            assert (data.report_labels([text])[0] == want).all(), text
    for s in sum(data._FIXED.values(), []) + ["2 additional smaller nodules up to 3 mm are seen."]:
        assert data.report_labels([s])[0].sum() == (1 if "nodule" in s else 0), s


def test_labeler_defined_answers_for_bad_input():
    assert (data.report_labels(["", "   "]) == 0).all()
    # non-English (CT-RATE's Turkish original): no English trigger phrase -> all zeros
    assert data.report_labels(["Kalp boyutu normal. Perikardiyal efüzyon saptanmadı."]).sum() == 0
    # affirmed and negated: present somewhere -> 1, in either order
    k = data.LABELS.index("Pleural effusion")
    for text in ("No pleural effusion on the left. A small pleural effusion is seen on the right.",
                 "A small pleural effusion is seen on the right. There is no pleural effusion on the left."):
        assert data.report_labels([text])[0, k] == 1
    assert data.report_labels(["Pleural effusion is not seen."])[0, k] == 0  # post-negation
    assert data.report_labels(["No nodule is seen but a pleural effusion is present."])[0, k] == 1  # 'but' ends scope
    with pytest.raises(TypeError):
        data.report_labels("a single string")


def test_clinical_metrics_by_hand():
    y = np.zeros((4, 18), dtype=int)
    y[:2, 0] = 1          # finding 0: positives in rows 0, 1
    y[0, 1] = 1           # finding 1: positive in row 0
    pred = np.zeros_like(y)
    pred[[0, 2], 0] = 1   # finding 0: TP 1, FP 1, FN 1 -> P = R = F1 = 1/2
    pred[1, 2] = 1        # finding 2: FP 1, no positives -> P = R = F1 = 0 (zero_division=0)
    m = data.clinical_metrics(pred, y)
    assert m["per_label"][0] == dict(label=data.LABELS[0], precision=0.5, recall=0.5, f1=0.5, support=2)
    assert m["per_label"][1]["f1"] == 0 and m["per_label"][1]["support"] == 1  # missed: FN 1
    assert m["per_label"][2]["precision"] == 0 and m["per_label"][2]["f1"] == 0
    assert m["f1"] == pytest.approx(0.5 / 18) and m["precision"] == pytest.approx(0.5 / 18)  # macro over all 18
    assert m["micro_f1"] == pytest.approx(2 * 1 / (2 * 1 + 2 + 2))  # TP 1, FP 2, FN 2
    # texts are read with report_labels: the same scores from sentences
    texts = ["A sternotomy wires is seen.", "The heart is enlarged (mild cardiomegaly).",
             "There is a pacemaker lead in place.", ""]
    assert data.clinical_metrics(texts, y)["f1"] == pytest.approx(m["f1"])
    with pytest.raises(ValueError, match=r"3 generated .* 4 reference"):
        data.clinical_metrics(texts[:3], y)


def test_ce_baselines():
    rng = np.random.default_rng(1)
    train = (rng.random((400, 18)) < np.linspace(0.05, 0.45, 18)).astype(int)
    test = (rng.random((300, 18)) < np.linspace(0.05, 0.45, 18)).astype(int)
    b = data.ce_baselines(train, test, seed=0)
    assert b["all_normal"]["f1"] == 0 and b["all_normal"]["micro_f1"] == 0
    p = test.mean(0)
    assert [d["f1"] for d in b["all_positive"]["per_label"]] == pytest.approx(2 * p / (1 + p))
    assert b["all_positive"]["recall"] == 1
    # random at the training prevalence q: expected F1 = 2pq / (p + q), close on 300 rows
    q = train.mean(0)
    assert b["prevalence_random"]["f1"] == pytest.approx(np.mean(2 * p * q / (p + q)), abs=0.03)
    assert data.ce_baselines(train, test, seed=0)["prevalence_random"] == b["prevalence_random"]  # seeded
    assert b["all_positive"]["f1"] > b["prevalence_random"]["f1"] > b["all_normal"]["f1"]
