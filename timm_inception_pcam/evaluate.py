"""Evaluate a PCam classifier on one split: metrics with bootstrap CIs, curves, plots and a JSON report.

    python -m timm_inception_pcam.evaluate --model inception_v4_pcam --checkpoint model_best.pth.tar \\
        --data-dir data/pcam --split test --tta 8 --output runs/eval

The decision threshold is chosen on the valid split (Youden's J, or max F1) and applied to the evaluated split; it
is never tuned on test. Without a valid split it is 0.5 (source "default"). With ``--tta 8`` the probabilities of
the 8 dihedral views are averaged, and the report gives the gain over the plain (identity) view, whose metrics come
from the same forward passes.

On a CPU the default backend (``--backend auto``) is ``bf16_checked`` where the CPU has AMX: bf16 forward passes,
then float32 for every patch whose probability could change what the report counts (`Settler`): the valid patches
that could change the choice of the threshold, and the evaluated patches whose decision at it bf16 rounding could
flip. The threshold and every count at it (confusion matrix, accuracy, F1, ...) are then float32's; the
threshold-free figures (ROC AUC, AP, NLL, ECE) come from the bf16 probabilities (about 1e-4 off). The report's
``backend_check`` says how many patches were settled. ``--backend channels_last`` runs float32 throughout.
"""
import argparse
import functools
import io
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import timm
import torch
from timm.utils import ParseKwargs
from tqdm import tqdm

from .checkpoint import CheckpointError, load_model
from .constants import LABEL_NAMES, PCAM_MEAN, PCAM_NUM_CLASSES, PCAM_STD
from .data import PCamDataset, dihedral
from .data.files import normalize_split
from .metrics import (
    THRESHOLD_METHODS,
    bootstrap_ci,
    compute_metrics,
    plot_confusion,
    plot_pr,
    plot_roc,
    pr_points,
    roc_points,
    select_threshold,
    threshold_metric_bounds,
)
from .predict import BACKENDS as CPU_BACKENDS
from .predict import DecisionCheck, create_predictor, mean_prob_bounds, straddling
from .preprocess import model_normalization, preprocess_patches
from .storage import atomic_path, atomic_write_json, file_sha256

__all__ = ['REPORT_FORMAT', 'TorchBackend', 'Settler', 'predict_probs', 'evaluate_split', 'main']

REPORT_FORMAT = 'timm-inception-pcam-report/1'
MAX_TTA = 8
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}
TTA_GAIN_KEYS = ('roc_auc', 'accuracy', 'f1', 'balanced_accuracy', 'nll', 'ece')
PLOTS = {'roc': 'roc.png', 'pr': 'pr.png', 'confusion': 'confusion.png'}

# A backend maps a float32 NCHW batch (normalised, on the CPU) to logits (N, 2): a torch model wrapped by
# TorchBackend, or any other runtime (onnxruntime, TensorRT) with the same call signature.
Backend = Callable[[torch.Tensor], 'torch.Tensor | np.ndarray']


class PatchSource(Protocol):
    def __len__(self) -> int: ...

    def read_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {str(device)!r} requested but no CUDA device is available (use --device cpu)')
    if device.type not in ('cpu', 'cuda'):
        raise ValueError(f'device {str(device)!r} not supported: expected cpu or cuda')
    return device


class TorchBackend:
    """Runs a torch model on `device` under optional autocast; returns float32 logits on the CPU."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device | None = 'cpu', amp: str = 'none'):
        if amp not in AMP_DTYPES:
            raise ValueError(f'amp {amp!r} not supported: expected one of {", ".join(AMP_DTYPES)}')
        self.device = resolve_device(device)
        self.amp_dtype = AMP_DTYPES[amp]
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.model(x)
        return logits.float().cpu()


class _Batches(torch.utils.data.Dataset):
    """Batch b of a patch source, preprocessed: (float32 NCHW, labels or None). Runs in DataLoader workers."""

    def __init__(self, source: PatchSource | np.ndarray, n: int, batch_size: int, mean: Sequence[float],
                 std: Sequence[float]):
        self.source, self.n, self.batch_size, self.mean, self.std = source, n, batch_size, mean, std

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __getitem__(self, b: int) -> np.ndarray:
        start, stop = b * self.batch_size, min((b + 1) * self.batch_size, self.n)
        if isinstance(self.source, np.ndarray):
            patches = self.source[start:stop]
        else:
            patches, _ = self.source.read_batch(np.arange(start, stop))
        return preprocess_patches(patches, self.mean, self.std, source=f'patches {start}..{stop - 1}')


def predict_probs(
        model: torch.nn.Module | Backend,
        data: PatchSource | np.ndarray,
        batch_size: int = 256,
        tta: int = 1,
        device: str | torch.device | None = 'cpu',
        amp: str = 'none',
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        workers: int = 0,
        limit: int | None = None,
        return_views: bool = False,
        progress: bool | None = None,
        desc: str = 'predict',
) -> np.ndarray:
    """Probability of class 1 (metastatic) for every patch of `data`, averaged over `tta` dihedral views.

    `model` is a torch module (run by `TorchBackend` on `device` with `amp`) or any backend callable
    (float32 NCHW CPU tensor -> logits (N, 2)); `data` is a PCamDataset (anything with ``read_batch``) or a uint8
    NHWC array. Views are ``dihedral(x, k)`` for k in range(tta), view 0 being the patch as stored. Mean/std default
    to the model's pretrained config. With `return_views` the result is (tta, N), else (N,).
    """
    if not 1 <= tta <= MAX_TTA:
        raise ValueError(f'tta must be between 1 and {MAX_TTA} (the dihedral group), got {tta}')
    if batch_size < 1:
        raise ValueError(f'batch_size must be at least 1, got {batch_size}')
    if isinstance(model, torch.nn.Module):
        if mean is None or std is None:
            mean, std = model_normalization(model)
        backend: Backend = TorchBackend(model, device, amp)
    else:
        backend = model
        mean, std = mean or PCAM_MEAN, std or PCAM_STD
    n = len(data) if limit is None else min(limit, len(data))
    batches = _Batches(data, n, batch_size, mean, std)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=workers,
                                         persistent_workers=False)
    views = np.empty((tta, n), dtype=np.float64)
    start = 0
    with tqdm(total=n, desc=desc, unit='patch', disable=None if progress is None else not progress,
              leave=False) as bar:
        for x in loader:
            stop = start + x.shape[0]
            for k in range(tta):
                logits = torch.as_tensor(backend(dihedral(x, k) if k else x))
                if logits.ndim != 2 or logits.shape != (x.shape[0], PCAM_NUM_CLASSES):
                    raise ValueError(f'model output has shape {tuple(logits.shape)} for a batch of {x.shape[0]}, '
                                     f'expected ({x.shape[0]}, {PCAM_NUM_CLASSES}) logits')
                views[k, start:stop] = torch.softmax(logits.double(), dim=1)[:, 1].numpy()
            start = stop
            bar.update(x.shape[0])
    return views if return_views else views.mean(axis=0)


class Settler:
    """Float32 for the `bf16_checked` evaluation wherever bf16 could change what the report counts.

    `views` (tta, N) are class-1 probabilities of the patches of `data` from the `bf16_checked` predictor; a patch
    is *settled* when all its views are recomputed by `check.exact` (in place). `at` settles the patches whose
    decision at a threshold is in doubt; `choose` picks the valid threshold float32 would pick.
    """

    def __init__(self, check: DecisionCheck, data: PatchSource | np.ndarray, views: np.ndarray, batch_size: int,
                 mean: Sequence[float], std: Sequence[float]):
        self.check, self.data, self.views = check, data, views
        self.batch_size, self.mean, self.std = batch_size, mean, std
        self.exact = np.zeros(views.shape[1], dtype=bool)

    @property
    def settled(self) -> int:
        return int(self.exact.sum())

    def rerun(self, doubt: np.ndarray) -> int:
        """Settle the patches of the boolean mask `doubt` not settled yet; returns how many."""
        idx = np.flatnonzero(doubt & ~self.exact)
        if len(idx):
            patches = self.data[idx] if isinstance(self.data, np.ndarray) else self.data.read_batch(idx)[0]
            self.views[:, idx] = predict_probs(self.check.exact, patches, self.batch_size, self.views.shape[0],
                                               mean=self.mean, std=self.std, return_views=True,
                                               desc='settle in float32')
            self.exact[idx] = True
        return int(len(idx))

    def bounds(self, plain: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p, lo, hi): every patch's probability (view 0 if `plain`, else the mean over views) and its bounds,
        which are p itself once settled."""
        views = self.views[:1] if plain else self.views
        with np.errstate(divide='ignore'):
            margins = np.log(views) - np.log1p(-views)
        lo, hi = mean_prob_bounds(margins, self.check.bound)
        p = views.mean(axis=0)
        lo[self.exact], hi[self.exact] = p[self.exact], p[self.exact]
        return p, lo, hi

    def at(self, threshold: float, plain: bool = False) -> int:
        _, lo, hi = self.bounds(plain)
        return self.rerun(straddling(lo, hi, [threshold]))

    def choose(self, labels: np.ndarray, method: str, plain: bool = False) -> float:
        """`select_threshold` on float32 probabilities, settling only the patches that could change its choice.

        A threshold t competes with the current choice c when its criterion could reach c's lowest possible
        value; the patches whose probability interval straddles a competitor are settled (those of the more
        promising half of the competitors first, which often rules out the rest), and the choice is made again,
        until no unsettled patch straddles any competitor: then every criterion value that could beat c is exact,
        and c is float32's choice. How many patches that takes depends on how flat the criterion is around its
        maximum: a few percent of valid on a sharp one, most of it on a badly calibrated model.
        """
        while True:
            p, lo, hi = self.bounds(plain)
            choice = select_threshold(labels, p, method)
            floor = threshold_metric_bounds(labels, lo, hi, [choice], method)[0][0]
            candidates = np.unique(np.concatenate([lo, hi]))
            best = threshold_metric_bounds(labels, lo, hi, candidates, method)[1]
            rivals = best >= floor
            promising = best >= max(floor, float(np.median(best[rivals])))
            if not (self.rerun(straddling(lo, hi, candidates[promising]))
                    or self.rerun(straddling(lo, hi, candidates[rivals]))):
                return choice


def _finite(x: Any) -> Any:
    """NaN / inf -> None, recursively, so the report is strict JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _open_split(data_dir: str | Path, split: str) -> PCamDataset:
    return PCamDataset(data_dir, split)


def _write_predictions(path: Path, labels: np.ndarray, probs: np.ndarray, threshold: float,
                       plain: np.ndarray | None) -> None:
    cols = [np.arange(labels.size), labels, probs, (probs >= threshold).astype(np.int64)]
    header, fmt = 'index,label,prob,pred', ['%d', '%d', '%.6f', '%d']
    if plain is not None:
        cols.append(plain)
        header, fmt = header + ',prob_no_tta', fmt + ['%.6f']
    buf = io.StringIO()
    np.savetxt(buf, np.column_stack(cols), fmt=fmt, delimiter=',', header=header, comments='')
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def evaluate_split(
        labels: np.ndarray,
        views: np.ndarray,
        threshold: float,
        plain_threshold: float | None = None,
        n_resamples: int = 1000,
        seed: int = 0,
) -> dict[str, Any]:
    """Metrics, bootstrap CIs, curves and TTA gain from per-view probabilities (tta, N)."""
    probs = views.mean(axis=0)
    metrics = compute_metrics(labels, probs, threshold)
    out: dict[str, Any] = {
        'metrics': metrics,
        'ci95': bootstrap_ci(labels, probs, threshold, n_resamples=n_resamples, seed=seed),
        'tta_gain': None,
        'curves': {'roc': roc_points(labels, probs), 'pr': pr_points(labels, probs)},
    }
    if views.shape[0] > 1:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # a single-class warning was already given for the TTA metrics
            plain = compute_metrics(labels, views[0], threshold if plain_threshold is None else plain_threshold)
        without = {k: plain[k] for k in TTA_GAIN_KEYS}
        out['tta_gain'] = {'without_tta': without, 'delta': {k: metrics[k] - without[k] for k in TTA_GAIN_KEYS}}
    return out


def _threshold(args: argparse.Namespace, predict: Callable[[PCamDataset, str], np.ndarray],
               split_views: tuple[np.ndarray, np.ndarray, Settler | None] | None,
               settler_for: Callable[[PCamDataset, np.ndarray], Settler] | None = None,
               ) -> tuple[dict[str, Any], float | None, int | None]:
    """({'value', 'source', 'method'[, 'valid_settled']}, threshold for the plain view, number of valid items used).

    With `settler_for` (the `bf16_checked` backend) the thresholds are `Settler.choose`n: float32's choice.
    """
    default = {'value': 0.5, 'source': 'default', 'method': None}
    if args.threshold_from == 'default':
        return default, None, None
    if split_views is not None:  # evaluating valid itself
        labels, views, settler = split_views
    else:
        try:
            valid = _open_split(args.data_dir, 'valid')
        except FileNotFoundError as e:
            warnings.warn(f'no valid split to choose the threshold on ({e}): using 0.5', stacklevel=2)
            return default, None, None
        views = predict(valid, 'valid')
        labels = valid.labels[:views.shape[1]]
        settler = settler_for(valid, views) if settler_for is not None else None

    def choose(plain: bool) -> float:
        if settler is not None:
            return settler.choose(labels, args.threshold_method, plain)
        return select_threshold(labels, views[0] if plain else views.mean(axis=0), args.threshold_method)

    try:
        chosen: dict[str, Any] = {'value': choose(False), 'source': 'valid', 'method': args.threshold_method}
        plain = choose(True) if views.shape[0] > 1 else None
    except ValueError as e:
        warnings.warn(f'valid split unusable for threshold selection ({e}): using 0.5', stacklevel=2)
        return default, None, None
    if settler is not None:
        chosen['valid_settled'] = settler.settled
    return chosen, plain, int(labels.size)


def _fmt(v: float | None) -> str:
    return 'nan' if v is None else f'{v:.4f}'


def _print_table(report: dict[str, Any]) -> None:
    m, ci, thr = report['metrics'], report['ci95'], report['threshold']
    gain = (report['tta_gain'] or {}).get('delta', {})
    print(f"\n{report['model']} on {report['split']} (n={report['n']}, tta={report['tta']}, "
          f"threshold {thr['value']:.4f} from {thr['source']}{', ' + thr['method'] if thr['method'] else ''})")
    print(f"{'metric':<18} {'value':>8}  {'95% CI':<19} {'TTA gain' if gain else ''}")
    for k in ('roc_auc', 'accuracy', 'balanced_accuracy', 'f1', 'weighted_f1', 'precision', 'recall',
              'average_precision', 'nll', 'ece', 'tpr', 'fpr'):
        v = m[k]
        lo_hi = f'[{ci[k][0]:.4f}, {ci[k][1]:.4f}]' if k in ci and ci[k][0] is not None else ''
        g = f'{gain[k]:+.4f}' if gain.get(k) is not None else ''
        print(f"{k:<18} {_fmt(v):>8}  {lo_hi:<19} {g}")
    print(f"confusion          TP {m['tp']}  FP {m['fp']}  TN {m['tn']}  FN {m['fn']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m timm_inception_pcam.evaluate', description=__doc__.split('\n')[0])
    p.add_argument('--model', default=None, help='model name (default: the architecture stored in the checkpoint)')
    p.add_argument('--checkpoint', required=True,
                   help="our checkpoint, timm train.py's .pth.tar, a .safetensors file or hf-hub:org/name")
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='e.g. depths="(1, 1, 1)"')
    p.add_argument('--use-ema', action='store_true', help='evaluate the EMA weights of the checkpoint')
    p.add_argument('--data-dir', required=True, help='folder with the PCam HDF5 files')
    p.add_argument('--split', default='test', help='train, valid or test (default: test)')
    p.add_argument('--tta', type=int, default=1, choices=range(1, MAX_TTA + 1), metavar='K',
                   help='number of dihedral views averaged, 1 (none) to 8 (all)')
    p.add_argument('--threshold-from', default='valid', choices=('valid', 'default'),
                   help='choose the threshold on the valid split, or use 0.5 (default: valid)')
    p.add_argument('--threshold-method', default='youden', choices=THRESHOLD_METHODS)
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--workers', type=int, default=2, help='DataLoader worker processes reading the HDF5 files')
    p.add_argument('--output', default='runs/evaluate', help='folder for report.json, predictions.csv and plots')
    p.add_argument('--device', default=None, choices=('cpu', 'cuda'), help='default: cuda when available')
    p.add_argument('--amp', default='none', choices=tuple(AMP_DTYPES))
    p.add_argument('--backend', default='auto', choices=('auto', *CPU_BACKENDS),
                   help='CPU inference path (timm_inception_pcam.predict), used on CPU without --amp. auto: '
                        'bf16_checked on AMX CPUs (bf16, with float32 for every patch that could change the choice '
                        'of the threshold or a decision at it), else channels_last (float32, BatchNorm folded); '
                        'eager = the model as it is')
    p.add_argument('--bootstrap', type=int, default=1000, help='bootstrap resamples for the 95%% CIs')
    p.add_argument('--seed', type=int, default=0, help='bootstrap seed')
    p.add_argument('--limit', type=int, default=None, help='evaluate only the first N patches of each split')
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns the report (also written to <output>/report.json)."""
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    split = normalize_split(args.split)
    dataset = _open_split(args.data_dir, split)  # fail on a missing split before loading any weights
    model = load_model(args.model, args.checkpoint, use_ema=args.use_ema, **args.model_kwargs)
    n_classes = getattr(model, 'num_classes', PCAM_NUM_CLASSES)
    if n_classes != PCAM_NUM_CLASSES:
        raise CheckpointError(f'{args.checkpoint}: model has {n_classes} classes, expected {PCAM_NUM_CLASSES} '
                              f'({", ".join(LABEL_NAMES)})')
    model_name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or args.model
    mean, std = model_normalization(model)
    device = resolve_device(args.device)
    check: DecisionCheck | None = None
    if device.type == 'cpu' and args.amp == 'none':
        # No per-batch thresholds: the threshold is chosen later, and `Settler` settles what depends on it.
        predictor = create_predictor(model, args.backend, args.batch_size, mean, std, thresholds=())
        backend, backend_name, check = predictor.logits, predictor.backend, predictor.check
    else:
        backend, backend_name = TorchBackend(model, device, args.amp), f'torch {device.type} amp={args.amp}'

    def predict(ds: PCamDataset, name: str) -> np.ndarray:
        return predict_probs(backend, ds, args.batch_size, args.tta, mean=mean, std=std, workers=args.workers,
                             limit=args.limit, return_views=True, desc=f'{name} x{args.tta}')

    views = predict(dataset, split)
    labels = np.asarray(dataset.labels[:views.shape[1]], dtype=np.int64)
    # bf16_checked: float32 wherever bf16 could change the threshold's choice or a counted decision
    settler_for = functools.partial(Settler, check, batch_size=args.batch_size, mean=mean, std=std) \
        if check is not None else None
    settler = settler_for(dataset, views) if settler_for is not None else None
    threshold, plain_threshold, valid_n = _threshold(args, predict, (labels, views, settler) if split == 'valid'
                                                     else None, settler_for)
    backend_check = None
    if settler is not None:
        settler.at(threshold['value'])
        if plain_threshold is not None:
            settler.at(plain_threshold, plain=True)
        backend_check = {**settler.check.stats(), 'settled': settler.settled, 'settled_at': threshold['value'],
                         'valid_settled': threshold.pop('valid_settled', None)}
    result = evaluate_split(labels, views, threshold['value'], plain_threshold, args.bootstrap, args.seed)

    out = Path(args.output)
    probs = views.mean(axis=0)
    _write_predictions(out / 'predictions.csv', labels, probs, threshold['value'], views[0] if args.tta > 1 else None)
    plot_roc(labels, probs, out / PLOTS['roc'], threshold['value'], title=f'ROC, {model_name}, {split}')
    plot_pr(labels, probs, out / PLOTS['pr'], threshold['value'], title=f'Precision-recall, {model_name}, {split}')
    plot_confusion(labels, probs, out / PLOTS['confusion'], threshold['value'], LABEL_NAMES)
    checkpoint = str(args.checkpoint)
    report = _finite({
        'format': REPORT_FORMAT,
        'model': model_name,
        'checkpoint': checkpoint,
        'checkpoint_sha256': file_sha256(checkpoint) if Path(checkpoint).is_file() else None,
        'split': split,
        'n': int(labels.size),
        'tta': args.tta,
        'threshold': {**threshold, 'valid_n': valid_n},
        'metrics': result['metrics'],
        'ci95': result['ci95'],
        'tta_gain': result['tta_gain'],
        'plots': dict(PLOTS),
        'predictions': 'predictions.csv',
        'curves': result['curves'],
        'bootstrap': {'n_resamples': args.bootstrap, 'seed': args.seed, 'method': 'percentile'},
        'normalization': {'mean': list(mean), 'std': list(std)},
        'data_dir': str(args.data_dir),
        'use_ema': args.use_ema,
        'amp': args.amp,
        'backend': backend_name,
        'backend_check': backend_check,
        'versions': {'timm': timm.__version__, 'torch': torch.__version__},
        'seconds': round(time.perf_counter() - t0, 2),
    })
    atomic_write_json(out / 'report.json', report)
    _print_table(report)
    m = report['metrics']
    print(f"evaluate: {model_name} on {split} (n={report['n']}, tta={args.tta}): ROC AUC {_fmt(m['roc_auc'])}, "
          f"accuracy {_fmt(m['accuracy'])}, F1 {_fmt(m['f1'])} at threshold {threshold['value']:.4f} "
          f"({threshold['source']}) -> {out / 'report.json'}")
    return report


def cli(argv: list[str] | None = None) -> int:
    """Command-line entry: bad input ends with a one-line error (exit 2) instead of a traceback."""
    try:
        main(argv)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        print(f'evaluate: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(cli())
