"""Binary classification metrics for PCam, built on scikit-learn.

Every function takes `labels` (0 = normal, 1 = metastatic), `probs` (the probability of class 1) and, where
a hard decision is needed, a `threshold`: a patch is called positive when ``prob >= threshold``.

Conventions (also in the README's evaluate section):

- A ratio whose denominator is zero (precision with no predicted positive, TPR with no positive label, ...)
  is NaN, never a silent 0.
- Single-class labels: ROC AUC, average precision and balanced accuracy are undefined; they are NaN and a
  `SingleClassWarning` is issued. Threshold selection needs both classes and raises ``ValueError``.
- Expected calibration error (ECE): Guo et al. 2017's top-label form with 15 equal-width bins over [0, 1]:
  confidence = max(p, 1 - p), the prediction is class 1 when p >= 0.5, bins are (lo, hi] (the first one [0, hi]),
  ECE = sum_b |B_b| / n * |accuracy(B_b) - mean confidence(B_b)|. It does not depend on `threshold`.
- NLL: mean negative log-likelihood of the true label, natural log, probabilities clipped to [1e-12, 1 - 1e-12].
- Bootstrap confidence intervals: percentile bootstrap (resample n items with replacement, seeded), resamples in
  which a metric is undefined (e.g. a single class for AUC) are ignored.
- Threshold selection on validation: Youden's J (max TPR - FPR over the ROC curve) by default, or max F1 over
  the precision-recall curve. The threshold is one of the validation scores; ties go to the highest threshold.
"""
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn import exceptions as skm_exceptions
from sklearn import metrics as skm

from .constants import LABEL_NAMES
from .storage import atomic_path

__all__ = [
    'SingleClassWarning', 'THRESHOLD_METHODS', 'ECE_BINS', 'check_inputs', 'confusion_counts', 'compute_metrics',
    'expected_calibration_error', 'negative_log_likelihood', 'resampled_metrics', 'bootstrap_ci', 'select_threshold',
    'threshold_metric_bounds', 'roc_points', 'pr_points', 'plot_roc', 'plot_pr', 'plot_confusion',
]

ECE_BINS = 15
NLL_EPS = 1e-12
THRESHOLD_METHODS = ('youden', 'f1')
BOOTSTRAP_METRICS = ('roc_auc', 'accuracy', 'f1')


class SingleClassWarning(UserWarning):
    """Labels hold one class only: ranking metrics (ROC AUC, average precision) are undefined (NaN)."""


def check_inputs(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (int64 labels in {0, 1}, float64 probabilities in [0, 1]) of equal, non-zero length."""
    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if labels.shape != probs.shape:
        raise ValueError(f'labels and probs differ in length: {labels.shape[0]} labels, {probs.shape[0]} probs')
    if labels.size == 0:
        raise ValueError('no items: labels and probs are empty')
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        raise ValueError(f'labels must be 0 or 1, found {labels[bad][0].item()!r} (item {int(np.argmax(bad))})')
    bad = ~((probs >= 0.0) & (probs <= 1.0))  # also catches NaN
    if bad.any():
        raise ValueError(f'probs must lie in [0, 1], found {probs[bad][0].item()!r} (item {int(np.argmax(bad))})')
    return labels.astype(np.int64), probs


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float('nan')


def confusion_counts(labels: Any, probs: Any, threshold: float = 0.5) -> dict[str, int]:
    """TP, FP, TN, FN for predictions ``probs >= threshold``."""
    labels, probs = check_inputs(labels, probs)
    pred = (probs >= threshold).astype(np.int64)
    tn, fp, fn, tp = skm.confusion_matrix(labels, pred, labels=[0, 1]).ravel()
    return {'tp': int(tp), 'fp': int(fp), 'tn': int(tn), 'fn': int(fn)}


def negative_log_likelihood(labels: Any, probs: Any) -> float:
    labels, probs = check_inputs(labels, probs)
    p = np.clip(probs, NLL_EPS, 1.0 - NLL_EPS)
    return float(skm.log_loss(labels, np.stack([1.0 - p, p], axis=1), labels=[0, 1]))


def expected_calibration_error(labels: Any, probs: Any, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE with `n_bins` equal-width bins (see the module docstring)."""
    labels, probs = check_inputs(labels, probs)
    pred = (probs >= 0.5).astype(np.int64)
    conf = np.where(pred == 1, probs, 1.0 - probs)
    correct = (pred == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin b holds (edges[b], edges[b + 1]]; a confidence of exactly 0 falls into the first bin
    bins = np.clip(np.searchsorted(edges, conf, side='left') - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    gap = np.abs(np.bincount(bins, weights=correct, minlength=n_bins) - np.bincount(bins, weights=conf,
                                                                                     minlength=n_bins))
    # sum_b |B_b|/n * |acc_b - conf_b| == sum_b |sum(correct in b) - sum(conf in b)| / n
    return float(gap[count > 0].sum() / labels.size)


def _single_class(labels: np.ndarray, what: str) -> bool:
    if labels.min() == labels.max():
        warnings.warn(f'only class {LABEL_NAMES[int(labels[0])]!r} ({int(labels[0])}) is present in the labels: '
                      f'{what} undefined (NaN)', SingleClassWarning, stacklevel=3)
        return True
    return False


def compute_metrics(labels: Any, probs: Any, threshold: float = 0.5) -> dict[str, float | int]:
    """All point metrics of the report: counts, rates, F1s, accuracies, ROC AUC, AP, NLL and ECE."""
    labels, probs = check_inputs(labels, probs)
    pred = (probs >= threshold).astype(np.int64)
    counts = confusion_counts(labels, probs, threshold)
    tp, fp, tn, fn = counts['tp'], counts['fp'], counts['tn'], counts['fn']
    single = _single_class(labels, 'ROC AUC, average precision and balanced accuracy are')
    nan = float('nan')
    out: dict[str, float | int] = {
        'accuracy': float(skm.accuracy_score(labels, pred)),
        'roc_auc': nan if single else float(skm.roc_auc_score(labels, probs)),
        'f1': float(skm.f1_score(labels, pred, zero_division=np.nan)),
        'weighted_f1': float(skm.f1_score(labels, pred, average='weighted', labels=[0, 1], zero_division=np.nan)),
        'precision': float(skm.precision_score(labels, pred, zero_division=np.nan)),
        'recall': float(skm.recall_score(labels, pred, zero_division=np.nan)),
        'balanced_accuracy': nan if single else float(skm.balanced_accuracy_score(labels, pred)),
        'average_precision': nan if single else float(skm.average_precision_score(labels, probs)),
        'nll': negative_log_likelihood(labels, probs),
        'ece': expected_calibration_error(labels, probs),
        **counts,
        'tpr': _ratio(tp, tp + fn),
        'fpr': _ratio(fp, fp + tn),
    }
    return out


def _resample_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """(B, m) item indices -> (B, n) multiplicities of each item in each resample."""
    b = indices.shape[0]
    flat = (indices + (np.arange(b, dtype=np.int64) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n)


def resampled_metrics(labels: Any, probs: Any, threshold: float, indices: np.ndarray) -> dict[str, np.ndarray]:
    """ROC AUC, accuracy and F1 of each resample ``labels[indices[b]], probs[indices[b]]``, vectorised.

    AUC is the Mann-Whitney statistic with ties counted one half (what ``roc_auc_score`` computes), from per-item
    multiplicities; undefined values are NaN.
    """
    labels, probs = check_inputs(labels, probs)
    indices = np.atleast_2d(np.asarray(indices, dtype=np.int64))
    n = labels.size
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise ValueError(f'resample indices must lie in [0, {n}), found {indices.min()}..{indices.max()}')
    w = _resample_counts(indices, n).astype(np.float64)
    pos = labels == 1
    pred = probs >= threshold
    with np.errstate(invalid='ignore', divide='ignore'):
        m = indices.shape[1]
        accuracy = w @ (pred == pos).astype(np.float64) / m
        tp = w @ (pred & pos).astype(np.float64)
        fp = w @ (pred & ~pos).astype(np.float64)
        fn = w @ (~pred & pos).astype(np.float64)
        f1 = 2 * tp / (2 * tp + fp + fn)
        f1[(2 * tp + fp + fn) == 0] = np.nan

        order = np.argsort(probs, kind='stable')
        sorted_probs = probs[order]
        starts = np.flatnonzero(np.r_[True, sorted_probs[1:] != sorted_probs[:-1]])
        ws = w[:, order]
        pos_sorted = pos[order]
        pos_w = np.add.reduceat(ws * pos_sorted, starts, axis=1)  # weight of positives per distinct score
        neg_w = np.add.reduceat(ws * ~pos_sorted, starts, axis=1)
        neg_below = np.cumsum(neg_w, axis=1) - neg_w
        n_pos, n_neg = pos_w.sum(axis=1), neg_w.sum(axis=1)
        roc_auc = (pos_w * (neg_below + 0.5 * neg_w)).sum(axis=1) / (n_pos * n_neg)
        roc_auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return {'roc_auc': roc_auc, 'accuracy': accuracy, 'f1': f1}


def bootstrap_ci(
        labels: Any,
        probs: Any,
        threshold: float = 0.5,
        n_resamples: int = 1000,
        seed: int = 0,
        confidence: float = 0.95,
        chunk: int = 64,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals ``{'roc_auc': [lo, hi], 'accuracy': [...], 'f1': [...]}``.

    Resamples are drawn `chunk` at a time from ``np.random.default_rng(seed)``, so the result depends on the seed
    only, not on memory. A metric undefined in every resample gets [NaN, NaN].
    """
    labels, probs = check_inputs(labels, probs)
    if n_resamples < 1:
        raise ValueError(f'n_resamples must be at least 1, got {n_resamples}')
    if not 0.0 < confidence < 1.0:
        raise ValueError(f'confidence must lie in (0, 1), got {confidence}')
    rng = np.random.default_rng(seed)
    n = labels.size
    parts: dict[str, list[np.ndarray]] = {k: [] for k in BOOTSTRAP_METRICS}
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))
        for k, v in resampled_metrics(labels, probs, threshold, idx).items():
            parts[k].append(v)
    tail = 100.0 * (1.0 - confidence) / 2.0
    out = {}
    for k, v in parts.items():
        values = np.concatenate(v)
        values = values[~np.isnan(values)]
        out[k] = [float(x) for x in np.percentile(values, [tail, 100.0 - tail])] if values.size else [np.nan] * 2
    return out


def select_threshold(labels: Any, probs: Any, method: str = 'youden') -> float:
    """Decision threshold chosen on validation data: Youden's J (default) or max F1 (see the module docstring)."""
    labels, probs = check_inputs(labels, probs)
    if method not in THRESHOLD_METHODS:
        raise ValueError(f'unknown threshold method {method!r}, expected one of {THRESHOLD_METHODS}')
    if labels.min() == labels.max():
        raise ValueError(f'cannot select a threshold: only class {int(labels[0])} is present in the labels')
    if method == 'youden':
        fpr, tpr, thresholds = skm.roc_curve(labels, probs, drop_intermediate=False)
        finite = np.isfinite(thresholds)  # the first point (threshold +inf) predicts nothing positive
        j = np.where(finite, tpr - fpr, -np.inf)
        return float(thresholds[int(np.argmax(j))])
    precision, recall, thresholds = skm.precision_recall_curve(labels, probs, drop_intermediate=False)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    with np.errstate(invalid='ignore', divide='ignore'):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall), nan=-1.0)
    best = np.flatnonzero(f1 == f1.max())
    return float(thresholds[best].max())


def threshold_metric_bounds(labels: Any, lo: Any, hi: Any, thresholds: Any,
                            method: str = 'youden') -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest `select_threshold` criterion at each of `thresholds` when patch i's probability is only
    known to lie in [lo_i, hi_i] (decision: probability >= threshold).

    Youden's J (TPR - FPR) and F1 both rise with true positives and fall with false positives, so the highest value
    counts every uncertain positive as found and every uncertain negative as rejected, the lowest the reverse.
    """
    labels = np.asarray(labels).astype(bool)
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    t = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    if method not in THRESHOLD_METHODS:
        raise ValueError(f'unknown threshold method {method!r}, expected one of {THRESHOLD_METHODS}')
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())

    def at_or_above(values: np.ndarray) -> np.ndarray:  # how many of `values` are >= each threshold
        return len(values) - np.searchsorted(np.sort(values), t, side='left')

    tp_lo, tp_hi = at_or_above(lo[labels]), at_or_above(hi[labels])
    fp_lo, fp_hi = at_or_above(lo[~labels]), at_or_above(hi[~labels])
    if method == 'youden':
        return tp_lo / max(n_pos, 1) - fp_hi / max(n_neg, 1), tp_hi / max(n_pos, 1) - fp_lo / max(n_neg, 1)
    with np.errstate(invalid='ignore', divide='ignore'):  # F1 = 2 TP / (TP + FP + P)
        f1_lo = np.nan_to_num(2 * tp_lo / (tp_lo + fp_hi + n_pos), nan=0.0)
        f1_hi = np.nan_to_num(2 * tp_hi / (tp_hi + fp_lo + n_pos), nan=0.0)
    return f1_lo, f1_hi


def _subsample(n: int, max_points: int) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))


def _finite_list(x: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in x]


def _curve(function: Callable[..., Any], labels: np.ndarray, probs: np.ndarray) -> Any:
    """An sklearn curve without its warnings for one class (the caller says so once, as SingleClassWarning)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', skm_exceptions.UndefinedMetricWarning)
        warnings.filterwarnings('ignore', message='No (positive|negative) ')
        return function(labels, probs)


def roc_points(labels: Any, probs: Any, max_points: int = 201) -> dict[str, list[float | None]] | None:
    """ROC curve sub-sampled to at most `max_points` (end points kept); the +inf threshold is written as None.
    None with one class in the labels: the curve is undefined."""
    labels, probs = check_inputs(labels, probs)
    if labels.min() == labels.max():
        return None
    fpr, tpr, thr = skm.roc_curve(labels, probs)
    keep = _subsample(fpr.size, max_points)
    return {'fpr': _finite_list(fpr[keep]), 'tpr': _finite_list(tpr[keep]), 'thresholds': _finite_list(thr[keep])}


def pr_points(labels: Any, probs: Any, max_points: int = 201) -> dict[str, list[float | None]] | None:
    """Precision-recall curve sub-sampled to at most `max_points`; the last point (recall 0) has threshold None.
    None without positives: recall is undefined."""
    labels, probs = check_inputs(labels, probs)
    if not labels.any():
        return None
    precision, recall, thr = skm.precision_recall_curve(labels, probs)
    thr = np.r_[thr, np.nan]
    keep = _subsample(precision.size, max_points)
    return {'precision': _finite_list(precision[keep]), 'recall': _finite_list(recall[keep]),
            'thresholds': _finite_list(thr[keep])}


def _save_figure(fig: Any, path: str | os.PathLike) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path, suffix='.png') as tmp:
        fig.savefig(tmp, format='png', dpi=120, bbox_inches='tight')
    return os.fspath(path)


def _figure(title: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas attached on save

    fig = Figure(figsize=(4.8, 4.4))
    ax = fig.add_subplot()
    ax.set_title(title)
    return fig, ax


def plot_roc(labels: Any, probs: Any, path: str | os.PathLike, threshold: float | None = None,
             title: str = 'ROC curve') -> str:
    """ROC curve PNG with its AUC in the legend and the operating point at `threshold` marked."""
    labels, probs = check_inputs(labels, probs)
    fpr, tpr, _ = _curve(skm.roc_curve, labels, probs)
    auc = float(skm.roc_auc_score(labels, probs)) if labels.min() != labels.max() else float('nan')
    fig, ax = _figure(title)
    ax.plot(fpr, tpr, lw=1.5, label=f'AUC = {auc:.4f}')
    ax.plot([0, 1], [0, 1], ls='--', lw=0.8, color='grey')
    if threshold is not None:
        c = confusion_counts(labels, probs, threshold)
        ax.plot(_ratio(c['fp'], c['fp'] + c['tn']), _ratio(c['tp'], c['tp'] + c['fn']), 'o', color='black',
                label=f'threshold {threshold:.3f}')
    ax.set(xlabel='false positive rate', ylabel='true positive rate', xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc='lower right')
    return _save_figure(fig, path)


def plot_pr(labels: Any, probs: Any, path: str | os.PathLike, threshold: float | None = None,
            title: str = 'Precision-recall curve') -> str:
    """Precision-recall curve PNG with average precision and the prevalence baseline."""
    labels, probs = check_inputs(labels, probs)
    precision, recall, _ = _curve(skm.precision_recall_curve, labels, probs)
    ap = float(skm.average_precision_score(labels, probs)) if labels.min() != labels.max() else float('nan')
    fig, ax = _figure(title)
    ax.step(recall, precision, where='post', lw=1.5, label=f'AP = {ap:.4f}')
    ax.axhline(labels.mean(), ls='--', lw=0.8, color='grey', label=f'prevalence {labels.mean():.3f}')
    if threshold is not None:
        c = confusion_counts(labels, probs, threshold)
        ax.plot(_ratio(c['tp'], c['tp'] + c['fn']), _ratio(c['tp'], c['tp'] + c['fp']), 'o', color='black',
                label=f'threshold {threshold:.3f}')
    ax.set(xlabel='recall', ylabel='precision', xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc='lower left')
    return _save_figure(fig, path)


def plot_confusion(labels: Any, probs: Any, path: str | os.PathLike, threshold: float = 0.5,
                   label_names: Sequence[str] = LABEL_NAMES, title: str | None = None) -> str:
    """Confusion matrix PNG: counts and row percentages (share of each true class)."""
    labels, probs = check_inputs(labels, probs)
    cm = skm.confusion_matrix(labels, (probs >= threshold).astype(np.int64), labels=[0, 1])
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    fig, ax = _figure(title or f'Confusion matrix (threshold {threshold:.3f})')
    ax.imshow(share, cmap='Blues', vmin=0.0, vmax=1.0)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f'{cm[i, j]}\n{100 * share[i, j]:.1f} %', ha='center', va='center',
                    color='white' if share[i, j] > 0.5 else 'black')
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=list(label_names), yticklabels=list(label_names),
           xlabel='predicted', ylabel='true')
    return _save_figure(fig, path)
