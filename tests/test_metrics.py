"""Metrics checked against values computed by hand on small cases, and against scikit-learn on resamples."""
import math
import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from timm_inception_pcam.metrics import (
    SingleClassWarning,
    bootstrap_ci,
    compute_metrics,
    confusion_counts,
    expected_calibration_error,
    negative_log_likelihood,
    plot_confusion,
    plot_pr,
    plot_roc,
    pr_points,
    resampled_metrics,
    roc_points,
    select_threshold,
)

# Six patches. Sorted by probability: 0.9(+) 0.7(-) 0.45(+) 0.3(-) 0.25(-) 0.1(-); 2 positives, 4 negatives.
LABELS6 = np.array([1, 1, 0, 0, 0, 0])
PROBS6 = np.array([0.9, 0.45, 0.7, 0.3, 0.25, 0.1])


def test_six_item_case_by_hand():
    m = compute_metrics(LABELS6, PROBS6, threshold=0.5)
    # predictions at 0.5: [1, 0, 1, 0, 0, 0] -> TP 1 (0.9), FN 1 (0.45), FP 1 (0.7), TN 3
    assert (m['tp'], m['fn'], m['fp'], m['tn']) == (1, 1, 1, 3)
    assert m['accuracy'] == pytest.approx(4 / 6)
    assert m['precision'] == pytest.approx(1 / 2)  # 1 / (1 + 1)
    assert m['recall'] == pytest.approx(1 / 2) and m['tpr'] == pytest.approx(1 / 2)
    assert m['fpr'] == pytest.approx(1 / 4)  # 1 / (1 + 3)
    assert m['f1'] == pytest.approx(1 / 2)  # 2PR / (P + R)
    # class 0: precision TN / (TN + FN) = 3/4, recall TN / (TN + FP) = 3/4 -> F1 3/4; weights 2/6 and 4/6
    assert m['weighted_f1'] == pytest.approx((2 * 0.5 + 4 * 0.75) / 6)
    assert m['balanced_accuracy'] == pytest.approx((1 / 2 + 3 / 4) / 2)
    # AUC over the 2 x 4 positive/negative pairs: 0.9 beats all 4 negatives, 0.45 beats 0.3, 0.25, 0.1 -> 7/8
    assert m['roc_auc'] == pytest.approx(7 / 8)
    # AP = sum over positives of (recall step) x precision: 0.9 -> 1/2 x 1/1, 0.45 -> 1/2 x 2/3
    assert m['average_precision'] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # NLL: probability given to the true class: 0.9, 0.45, 1-0.7, 1-0.3, 1-0.25, 1-0.1
    assert m['nll'] == pytest.approx(-sum(math.log(q) for q in (0.9, 0.45, 0.3, 0.7, 0.75, 0.9)) / 6)
    # ECE, 15 bins of width 1/15, confidence max(p, 1-p):
    #   0.55 (p=0.45, predicted 0, wrong)          -> bin (8/15, 9/15]:   |0 - 0.55| x 1/6
    #   0.7 (p=0.7, wrong), 0.7 (p=0.3, right)     -> bin (10/15, 11/15]: |0.5 - 0.7| x 2/6
    #   0.75 (p=0.25, right)                       -> bin (11/15, 12/15]: |1 - 0.75| x 1/6
    #   0.9 (p=0.9, right), 0.9 (p=0.1, right)     -> bin (13/15, 14/15]: |1 - 0.9| x 2/6
    assert m['ece'] == pytest.approx((0.55 + 2 * 0.2 + 0.25 + 2 * 0.1) / 6)


def test_threshold_is_inclusive_and_moves_counts():
    # at exactly 0.45 the 0.45 positive is called positive: TP 2, FP 1 (0.7)
    assert confusion_counts(LABELS6, PROBS6, 0.45) == {'tp': 2, 'fp': 1, 'tn': 3, 'fn': 0}
    assert confusion_counts(LABELS6, PROBS6, 0.95) == {'tp': 0, 'fp': 0, 'tn': 4, 'fn': 2}
    m = compute_metrics(LABELS6, PROBS6, threshold=0.95)
    assert math.isnan(m['precision'])  # nothing predicted positive: 0/0 is NaN, not 0
    assert m['recall'] == 0.0


def test_ece_zero_when_confident_and_right_and_bins_matter():
    assert expected_calibration_error([0, 1, 1, 0], [0.0, 1.0, 1.0, 0.0]) == pytest.approx(0.0)
    # one bin: the mean confidence 0.8 vs accuracy 0.5 -> 0.3; fifteen bins separate 0.7 / 0.9 the same way here
    assert expected_calibration_error([1, 0], [0.7, 0.9], n_bins=1) == pytest.approx(abs(0.5 - 0.8))
    # conf 0.6 (right) and 0.95 (wrong) fall in different bins: (|1 - 0.6| + |0 - 0.95|) / 2
    assert expected_calibration_error([1, 0], [0.6, 0.95]) == pytest.approx((0.4 + 0.95) / 2)
    assert expected_calibration_error([1, 0], [0.6, 0.95], n_bins=1) == pytest.approx(abs(0.5 - 0.775))


def test_nll_clips_certain_mistakes():
    nll = negative_log_likelihood([1, 0], [0.0, 0.0])
    assert np.isfinite(nll) and nll == pytest.approx(-math.log(1e-12) / 2, rel=1e-6)


def test_threshold_selection_by_hand():
    # ranked: .9+ .8+ .7- .6+ .5- .4+ .3- .2-, 4 positives / 4 negatives; at each threshold (TPR - FPR, F1):
    # .9 (.25, .40)  .8 (.50, .67)  .7 (.25, .57)  .6 (.50, .75)  .5 (.25, .67)  .4 (.50, .80)  .3 (.25, .73)
    labels = [1, 1, 0, 1, 0, 1, 0, 0]
    probs = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    assert select_threshold(labels, probs) == pytest.approx(0.8)  # J ties at 0.8, 0.6, 0.4: highest wins
    assert select_threshold(labels, probs, 'f1') == pytest.approx(0.4)
    assert select_threshold(LABELS6, PROBS6) == pytest.approx(0.45)  # J: 0.5, 0.25, 0.75 (at 0.45), 0.5, ...
    with pytest.raises(ValueError, match='unknown threshold method'):
        select_threshold(labels, probs, 'accuracy')


def test_threshold_selection_matches_brute_force():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1).round(2)
    best_j, best_f1 = (-2.0, None), (-1.0, None)
    for t in sorted(set(p.tolist()), reverse=True):
        c = confusion_counts(y, p, t)
        j = c['tp'] / (c['tp'] + c['fn']) - c['fp'] / (c['fp'] + c['tn'])
        f1 = 2 * c['tp'] / (2 * c['tp'] + c['fp'] + c['fn'])
        best_j = max(best_j, (j, t), key=lambda x: x[0])  # strict improvement only: ties keep the higher t
        best_f1 = max(best_f1, (f1, t), key=lambda x: x[0])
    assert select_threshold(y, p) == pytest.approx(best_j[1])
    assert select_threshold(y, p, 'f1') == pytest.approx(best_f1[1])


def test_single_class_labels():
    with pytest.warns(SingleClassWarning, match='only class'):
        m = compute_metrics([0, 0, 0], [0.2, 0.7, 0.4], threshold=0.5)
    assert math.isnan(m['roc_auc']) and math.isnan(m['average_precision']) and math.isnan(m['balanced_accuracy'])
    assert math.isnan(m['tpr']) and math.isnan(m['recall'])  # no positive label
    assert m['fpr'] == pytest.approx(1 / 3) and m['accuracy'] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match='only class 1'):
        select_threshold([1, 1], [0.3, 0.6])
    ci = bootstrap_ci([1, 1, 1], [0.3, 0.6, 0.9], n_resamples=20)
    assert all(math.isnan(v) for v in ci['roc_auc'])
    assert ci['accuracy'][0] <= ci['accuracy'][1]


def test_two_class_data_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        compute_metrics(LABELS6, PROBS6)


@pytest.mark.parametrize('labels, probs, match', [
    ([0, 1], [0.5], 'differ in length'),
    ([], [], 'empty'),
    ([0, 2], [0.1, 0.2], 'labels must be 0 or 1, found 2'),
    ([0, 1], [0.1, 1.5], r'probs must lie in \[0, 1\], found 1.5'),
    ([0, 1], [0.1, float('nan')], 'probs must lie'),
])
def test_bad_inputs(labels, probs, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(labels, probs)


def test_resampled_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = rng.random(200).round(1)  # many ties
    idx = rng.integers(0, 200, size=(5, 200))
    r = resampled_metrics(y, p, 0.5, idx)
    for b in range(5):
        yb, pb = y[idx[b]], p[idx[b]]
        assert r['roc_auc'][b] == pytest.approx(roc_auc_score(yb, pb), abs=1e-12)
        assert r['accuracy'][b] == pytest.approx(accuracy_score(yb, pb >= 0.5))
        assert r['f1'][b] == pytest.approx(f1_score(yb, pb >= 0.5))
    # resamples of another length, and one with a single class (AUC undefined)
    idx = np.array([[0, 1, 2], [3, 3, 3]])
    y2 = np.array([0, 1, 1, 0])
    r = resampled_metrics(y2, [0.2, 0.6, 0.1, 0.4], 0.5, idx)
    assert r['roc_auc'][0] == pytest.approx(0.5) and math.isnan(r['roc_auc'][1])
    assert r['accuracy'].tolist() == pytest.approx([2 / 3, 1.0])


def test_bootstrap_ci_seeded_and_sensible():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 2000)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    point = compute_metrics(y, p, 0.5)
    ci = bootstrap_ci(y, p, 0.5, n_resamples=200, seed=7)
    assert ci == bootstrap_ci(y, p, 0.5, n_resamples=200, seed=7, chunk=33)  # depends on the seed, not the chunks
    assert ci != bootstrap_ci(y, p, 0.5, n_resamples=200, seed=8)
    for k in ('roc_auc', 'accuracy', 'f1'):
        lo, hi = ci[k]
        assert lo < point[k] < hi
        assert 0.005 < hi - lo < 0.1  # about 4 standard errors of a proportion over 2000 items
    wider = bootstrap_ci(y[:200], p[:200], 0.5, n_resamples=200, seed=7)
    assert wider['accuracy'][1] - wider['accuracy'][0] > ci['accuracy'][1] - ci['accuracy'][0]


def test_curve_points_subsampled():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 5000)
    p = rng.random(5000)
    roc = roc_points(y, p, max_points=50)
    assert len(roc['fpr']) == len(roc['tpr']) == len(roc['thresholds']) <= 50
    assert roc['fpr'][0] == 0.0 and roc['fpr'][-1] == 1.0 and roc['tpr'][-1] == 1.0
    assert roc['thresholds'][0] is None  # +inf is not JSON
    assert all(a <= b for a, b in zip(roc['fpr'], roc['fpr'][1:], strict=False))
    pr = pr_points(y, p, max_points=50)
    assert len(pr['precision']) <= 50 and pr['recall'][-1] == 0.0 and pr['thresholds'][-1] is None


@pytest.mark.parametrize('plot', [plot_roc, plot_pr, plot_confusion])
def test_plots_are_png_and_atomic(tmp_path, plot):
    path = tmp_path / 'out' / f'{plot.__name__}.png'
    plot(LABELS6, PROBS6, path, threshold=0.5)
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 200 and im.size[1] > 200
        assert np.unique(np.asarray(im.convert('L'))).size > 10  # something was drawn
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.parametrize('method', ['youden', 'f1'])
def test_threshold_metric_bounds_contain_every_realisation(method):
    from timm_inception_pcam.metrics import threshold_metric_bounds

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    p = np.clip(0.5 * labels + rng.uniform(0, 0.5, 300), 0, 1)
    t = np.linspace(0.05, 0.95, 37)

    def criterion(probs: np.ndarray, thr: float) -> float:
        tp = int(((probs >= thr) & (labels == 1)).sum())
        fp = int(((probs >= thr) & (labels == 0)).sum())
        pos, neg = int(labels.sum()), int((labels == 0).sum())
        return tp / pos - fp / neg if method == 'youden' else 2 * tp / (tp + fp + pos)

    lo, hi = threshold_metric_bounds(labels, p, p, t, method)  # exact probabilities: both bounds are the value
    np.testing.assert_allclose(lo, [criterion(p, x) for x in t])
    np.testing.assert_allclose(hi, lo)
    width = rng.uniform(0, 0.1, 300)
    lo, hi = threshold_metric_bounds(labels, p - width, p + width, t, method)
    assert (hi > lo).any()
    for _ in range(20):  # any probabilities within the intervals score within the bounds
        q = p + rng.uniform(-1, 1, 300) * width
        values = np.array([criterion(q, x) for x in t])
        assert (lo - 1e-12 <= values).all() and (values <= hi + 1e-12).all()
    with pytest.raises(ValueError, match='unknown threshold method'):
        threshold_metric_bounds(labels, p, p, t, 'accuracy')
