"""Metrics of data.py against values worked out by hand from each metric's definition."""
import math

import numpy as np
import pytest
import torch

import data


def approx(x, rel=1e-6):
    return pytest.approx(x, rel=rel, abs=1e-12)


# ---- classification ----

def test_auroc_ties_by_pair_counting():
    y = [0, 0, 1, 1, 0, 1]
    s = [0.1, 0.4, 0.4, 0.8, 0.8, 0.9]
    # every (positive, negative) pair: 1 if the positive scores higher, 1/2 on a tie
    pos, neg = [v for v, t in zip(s, y) if t], [v for v, t in zip(s, y) if not t]
    by_pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))
    assert by_pairs == 7 / 9  # 0.4: 1 + .5 + 0; 0.8: 1 + 1 + .5; 0.9: 3
    assert data.auroc(y, s) == approx(7 / 9)
    assert data.auroc(torch.tensor(y), torch.tensor(s)) == approx(7 / 9)
    assert data.auroc([1, 1, 0], [0.1, 0.2, 0.9]) == 0.0
    assert math.isnan(data.auroc([1, 1, 1], [0.1, 0.5, 0.9]))  # one class: undefined, never 0.5


def test_best_f1_thresholds_tiny():
    y = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 0], [0, 0, 1], [0, 0, 0]])
    s = np.array([[.9, .3, .5], [.8, .2, .5], [.7, .9, .5], [.3, .1, .2], [.1, .4, .1]])
    th = data.best_f1_thresholds(y, s)
    # column 0, t = .9/.8/.7/.3/.1 -> (TP, FP) = (1,0) (1,1) (2,1) (2,2) (2,3) -> F1 = 2/3, 1/2, 4/5, 2/3, 4/7
    assert th[0] == 0.7
    # column 1 has no positives: a threshold above every score predicts all negative
    assert th[1] > 0.9 and not (s[:, 1] >= th[1]).any()
    # column 2 ties: t=.5 takes three rows at once (TP 2, FP 1 -> 4/5); t=.2 -> TP 3, FP 1 -> 6/7; t=.1 -> 6/8
    assert th[2] == 0.2


def test_classification_metrics_and_undefined_label():
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]])
    s = np.array([[.9, .2, .1], [.4, .8, .7], [.6, .3, .2], [.1, .6, .3]])
    m = data.classification_metrics(y, s, [0.5, 0.5, 0.5], labels=["a", "b", "c"])
    # a: pred 1,0,1,0 vs 1,1,0,0 -> TP1 FP1 FN1 TN1; b: pred 0,1,0,1 vs 0,1,1,0 -> TP1 FP1 FN1 TN1
    # c: all negative in this split, pred 0,1,0,0 -> FP1: auroc, recall, f1 undefined; precision 0/1 = 0
    pa = m["per_label"]["a"]
    assert (pa["accuracy"], pa["precision"], pa["recall"], pa["f1"], pa["support"]) == (0.5, 0.5, 0.5, 0.5, 2)
    assert pa["auroc"] == approx(3 / 4)  # pos .9, .4 vs neg .6, .1: (1 + 1 + 0 + 1) / 4
    assert m["per_label"]["b"]["auroc"] == approx(3 / 4)  # pos .8, .3 vs neg .2, .6: (1 + 1 + 1 + 0) / 4
    pc = m["per_label"]["c"]
    assert math.isnan(pc["auroc"]) and math.isnan(pc["recall"]) and math.isnan(pc["f1"])
    assert pc["precision"] == 0.0 and pc["accuracy"] == 0.75
    assert m["undefined"]["auroc"] == ["c"] and m["undefined"]["f1"] == ["c"] and m["undefined"]["precision"] == []
    assert m["auroc"] == approx(3 / 4)  # mean over a and b: c is excluded, not counted as 0.5
    assert m["accuracy"] == approx((0.5 + 0.5 + 0.75) / 3)
    assert m["precision"] == approx((0.5 + 0.5 + 0.0) / 3)
    assert m["recall"] == approx((0.5 + 0.5 + 0.0) / 3) and m["f1"] == approx((0.5 + 0.5 + 0.0) / 3)  # c counts 0
    assert m["weighted_f1"] == approx((0.5 * 2 + 0.5 * 2) / 4)


def test_macro_means_count_undefined_labels_as_zero_like_sklearn():
    """sklearn's precision_recall_fscore_support(average="macro" / "weighted", zero_division=0), worked by hand:
    an undefined precision (no predicted positives), recall or f1 (no actual positives) is 0 in the mean."""
    y = np.array([[1, 1, 0, 0, 1], [1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 1]])
    s = np.array([[.9, .4, .1, .1, .9], [.8, .3, .6, .1, .2], [.7, .2, .2, .1, .3], [.2, .1, .3, .1, .4],
                  [.1, .0, .4, .1, .6]])
    m = data.classification_metrics(y, s, [0.5] * 5, labels=["a", "b", "c", "d", "e"])
    # at 0.5:  a: pred 1,1,1,0,0 vs 1,1,0,0,0 -> TP2 FP1 FN0: P 2/3, R 1, F1 4/(4+1) = 4/5, support 2
    #          b: pred 0 0 0 0 0 vs 1,0,1,0,0 -> TP0 FP0 FN2: P undefined (0), R 0, F1 0, support 2
    #          c: pred 0,1,0,0,0 vs all 0     -> TP0 FP1 FN0: P 0, R undefined (0), F1 undefined (0), support 0
    #          d: pred all 0 vs all 0         -> P, R, F1 undefined (0), support 0
    #          e: pred 1,0,0,0,1 vs 1,0,0,1,1 -> TP2 FP0 FN1: P 1, R 2/3, F1 4/5, support 3
    assert m["undefined"]["precision"] == ["b", "d"] and m["undefined"]["recall"] == ["c", "d"]
    assert m["undefined"]["f1"] == ["c", "d"] and m["undefined"]["auroc"] == ["c", "d"]
    assert math.isnan(m["per_label"]["b"]["precision"]) and math.isnan(m["per_label"]["c"]["recall"])
    assert m["precision"] == approx((2 / 3 + 0 + 0 + 0 + 1) / 5)  # skipping b, d would give 5/9
    assert m["recall"] == approx((1 + 0 + 0 + 0 + 2 / 3) / 5)     # skipping c, d would give 5/9
    assert m["f1"] == approx((4 / 5 + 0 + 0 + 0 + 4 / 5) / 5)     # skipping c, d would give 8/15
    assert m["weighted_f1"] == approx((4 / 5 * 2 + 0 * 2 + 4 / 5 * 3) / 7)  # support-0 labels weigh nothing
    assert m["accuracy"] == approx((4 / 5 + 3 / 5 + 4 / 5 + 1 + 4 / 5) / 5)
    # auroc: a 1 (pos .9 .8 above every neg); b pos .4 .2 vs neg .3 .1 .0 -> 5/6; e pos .9 .4 .6 vs .2 .3 -> 1
    assert m["auroc"] == approx((1 + 5 / 6 + 1) / 3)  # no zero_division for auroc: one-class labels left out
    # no positives at all: sklearn's weighted average is zero_division (0), not nan
    none = data.classification_metrics(np.zeros((3, 2)), np.full((3, 2), 0.9), [0.5, 0.5])
    assert none["weighted_f1"] == 0.0 and none["f1"] == 0.0 and none["precision"] == 0.0


def test_weighted_f1_by_support():
    y = np.array([[1, 1], [1, 0], [1, 0], [0, 0]])
    s = np.array([[1, 1], [1, 0], [0, 1], [0, 0]])
    m = data.classification_metrics(y, s, [0.5, 0.5])
    f0, f1 = 2 * 2 / (2 * 2 + 0 + 1), 2 * 1 / (2 * 1 + 1 + 0)  # 4/5 (support 3), 2/3 (support 1)
    assert m["f1"] == approx((f0 + f1) / 2) and m["weighted_f1"] == approx((3 * f0 + 1 * f1) / 4)


# ---- report metrics ----

def test_tokenisation():
    assert data.metric_tokens("Nodule, 3.5 mm; the LEFT lobe.") == ["nodule", ",", "3.5", "mm", ";", "the", "left",
                                                                     "lobe", "."]


def test_sentence_against_itself():
    s = "a small nodule in the left lower lobe"  # 8 tokens
    m = data.report_metrics([s], [[s]])
    for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL"):
        assert m[k] == approx(1.0), k
    assert m["meteor"] == approx(1 - 0.5 * (1 / 8) ** 3)  # P = R = 1, one chunk of 8 matches
    assert m["cider"] == 0.0  # one image: idf = log(1) - log(1) = 0 for every n-gram (as pycocoevalcap)
    assert m["mean"] == approx(np.mean([m[k] for k in m if k != "mean"]))


def test_bleu_two_sentences_by_hand():
    hyps = ["the cat sat on the mat", "a dog"]
    refs = [["the cat is on the mat", "the cat"], ["a dog barked loudly", "a big dog"]]
    # clipping takes each n-gram's max count over the references ("the cat" adds nothing new here)
    # 1-grams: the x2, cat, on, mat clip to 5 of 6; a, dog 2 of 2 -> 7/8
    # 2-grams: the cat, on the, the mat 3 of 5; a dog 1 of 1 -> 4/6
    # 3-grams: on the mat 1 of 4; none in "a dog" -> 1/4;  4-grams: 0 of 3
    # length: c = 6 + 2 = 8; closest refs 6 (not the shorter 2) and 3 (|3-2| < |4-2|) -> r = 9; BP = exp(1 - 9/8)
    bp = math.exp(1 - 9 / 8)
    p = [7 / 8, 4 / 6, 1 / 4, 1e-15 / 3]
    want = [bp * np.prod(p[:k]) ** (1 / k) for k in range(1, 5)]
    m = data.report_metrics(hyps, refs)
    for k in range(4):
        assert m[f"bleu{k + 1}"] == approx(want[k]), k
    # ROUGE-1 F, max over refs: max(F(5/6, 5/6), F(2/6, 1) = 1/2) = 5/6; "a dog": max(F(1, 2/4), F(1, 2/3)) = 4/5
    assert m["rouge1"] == approx((5 / 6 + 4 / 5) / 2)
    # ROUGE-2 F: max(F(3/5, 3/5), F(1/5, 1) = 1/3) = 3/5; "a dog": F(1, 1/3) = 1/2 vs 0 -> 1/2
    assert m["rouge2"] == approx((3 / 5 + 1 / 2) / 2)
    # ROUGE-L (beta 1.2), pycocoevalcap maximises P and R separately over the references, then
    # F = (1 + b^2) P R / (R + b^2 P): LCS "the cat on the mat" = 5 -> P 5/6; LCS with "the cat" = 2 -> R 2/2;
    # "a dog": LCS 2 with both, max P = 1, max R = 2/3
    F = lambda P, R, b2=1.2 ** 2: (1 + b2) * P * R / (R + b2 * P)
    assert m["rougeL"] == approx((F(5 / 6, 1.0) + F(1.0, 2 / 3)) / 2)


def test_bit_parallel_lcs_matches_dp():
    def dp(a, b):  # the textbook table, row by row
        prev = [0] * (len(b) + 1)
        for x in a:
            cur = [0]
            for j, y in enumerate(b):
                cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
            prev = cur
        return prev[-1]
    rng = np.random.default_rng(0)
    for _ in range(2000):
        a, b = (list(rng.choice(list("abcd"), rng.integers(0, 15))) for _ in range(2))
        assert data._lcs(a, b) == dp(a, b), (a, b)
    assert data._lcs("the cat sat on the mat".split(), "the cat is on the mat".split()) == 5


def test_meteor_chunk_penalty():
    # hyp "nodule in the left lung" vs ref "left lung nodule": matches nodule(0->2), left(3->0), lung(4->1)
    # chunks: [nodule] [left lung] = 2 of 3 matches; P = 3/5, R = 1; Fmean = PR / (0.9 P + 0.1 R)
    P, R = 3 / 5, 1.0
    fmean = P * R / (0.9 * P + 0.1 * R)
    want = (1 - 0.5 * (2 / 3) ** 3) * fmean
    h, r = data.metric_tokens("nodule in the left lung"), data.metric_tokens("left lung nodule")
    assert data.meteor(h, [r]) == approx(want)
    # swapped halves: a b c d vs c d a b -> 2 chunks of 4 matches, P = R = 1
    assert data.meteor(list("abcd"), [list("cdab")]) == approx(1 - 0.5 * (2 / 4) ** 3)
    assert data.meteor(["x"], [["y"]]) == 0.0
    # max over references
    assert data.meteor(list("abcd"), [list("cdab"), list("abcd")]) == approx(1 - 0.5 * (1 / 4) ** 3)


def test_cider_three_images_by_hand():
    refs = [["lung clear"], ["lung nodule"], ["heart normal"]]
    hyps = ["lung clear", "lung", "heart big"]
    L3 = math.log(3)
    # idf = log(#images) - log(max(1, df)): lung df 2; clear, nodule, heart, normal and every bigram df 1;
    # "big" never occurs in a reference: df 0 -> max(1, 0) = 1 -> idf log 3
    w_lung = L3 - math.log(2)
    # image 1: hypothesis == reference -> cosine 1 for unigrams and bigrams, 0 for 3-, 4-grams (zero norms)
    s1 = 10 * (1 + 1 + 0 + 0) / 4
    # image 2: unigram vectors h = {lung: w}, r = {lung: w, nodule: L3}: min(w, w) w / (w sqrt(w^2 + L3^2));
    # no bigram in the hypothesis; length penalty on bigram counts 0 vs 1: exp(-1 / (2 * 36))
    s2 = 10 * (w_lung / math.sqrt(w_lung ** 2 + L3 ** 2)) * math.exp(-1 / 72) / 4
    # image 3: h = {heart: L3, big: L3}, r = {heart: L3, normal: L3}: L3^2 / (sqrt2 L3)^2 = 1/2; bigrams differ
    s3 = 10 * 0.5 / 4
    m = data.report_metrics(hyps, refs)
    assert m["cider"] == approx((s1 + s2 + s3) / 3)
    assert data.cider_d([h.split() for h in hyps], [[r.split() for r in rs] for rs in refs]) == approx([s1, s2, s3])


def test_report_metrics_shape():
    m = data.report_metrics(["no effusion.", ""], ["No effusion.", ["normal study.", "unremarkable."]])
    assert list(m) == ["bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge1", "rouge2", "rougeL", "cider", "mean"]
    assert all(np.isfinite(v) for v in m.values())
    assert m["rouge1"] == approx(0.5)  # the empty prediction scores 0, the exact one 1


# ---- VQA ----

def test_vqa():
    preds = ["Yes.", "The left lung", "no", "An effusion!"]
    answers = ["yes", "left lung", "yes", "effusion"]
    assert data.vqa_closed_accuracy(preds, answers) == 0.75
    assert data.choice_correct("The answer is B. Left lower lobe", "B")
    assert data.choice_correct("C. pleura", "C. Pleura")
    assert not data.choice_correct("A. right lung", "B")
    assert not data.choice_correct("B", "B")  # the letter must be followed by "."


def test_bootstrap_interval():
    """The 95% interval of the macro AUROC: a point for perfect scores, around 0.5 and narrowing with n for noise."""
    rng = np.random.default_rng(0)
    y = (rng.random((200, 3)) < 0.3).astype(float)
    assert data.bootstrap_auroc(y, y + 0.1 * rng.random(y.shape), n=50) == (1.0, 1.0)
    lo, hi = data.bootstrap_auroc(y, rng.random(y.shape), n=200)
    lo4, hi4 = data.bootstrap_auroc(np.tile(y, (4, 1)), rng.random((800, 3)), n=200)
    assert lo < 0.5 < hi and lo4 < 0.5 < hi4 and hi4 - lo4 < 0.7 * (hi - lo), (lo, hi, lo4, hi4)
