"""Evaluate a PCam classifier on one split: metrics with bootstrap CIs, curves, plots and a JSON report.

    python -m timm_inception_pcam.evaluate --checkpoint model_best.pth.tar --data-dir data/pcam --split test \\
        --tta 8 --output runs/eval

`--checkpoint` is any artefact the inference layer runs (`timm_inception_pcam.inference.create_runner`): a
checkpoint, an ONNX file (FP32 or FP16) or a TensorRT plan; the report says which was scored and how.
The decision threshold is chosen on the valid split (Youden's J, or max F1) and applied to the evaluated split; it
is never tuned on test. Without a valid split it is 0.5 (source "default"). With ``--tta 8`` the probabilities of
the 8 dihedral views are averaged, and the report gives the gain over the plain (identity) view, whose metrics come
from the same forward passes.

On a CPU the default backend (``--backend auto``) is a checked bf16 path where the CPU computes bf16 in hardware,
AMX or AVX-512 BF16 (``openvino_bf16_checked``, or torch's ``bf16_checked`` without OpenVINO): bf16 forward passes,
then float32 for every patch whose probability could change what the report counts (`Settler`): the valid patches
that could change the choice of the threshold, and the evaluated patches whose decision at it bf16 rounding could
flip. The threshold and every count at it (confusion matrix, accuracy, F1, ...) are then float32's; the
threshold-free figures (ROC AUC, AP, NLL, ECE) come from the bf16 probabilities (about 1e-4 off). Unlike the
slide command's, the evaluator's ``auto`` never becomes the int8 cascade, whose error on those figures is not bounded;
``--backend openvino_cascade`` runs it (int8 first, the patches in doubt re-scored in bf16, those still in doubt in
float32). The report's ``backend_check`` says how many patches were settled. ``--backend channels_last`` runs
float32 throughout.
"""
import argparse
import dataclasses
import functools
import io
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

from .checkpoint import ModelKwargsAction, load_model
from .constants import LABEL_NAMES, MAX_SEED, MAX_WORKERS, PCAM_NUM_CLASSES
from .data import PCamDataset
from .data.files import normalize_split, split_paths
from .data.provenance import folder_provenance
from .errors import ArgumentParser, CheckpointError, DataError, InferenceError, UsageError, check_range, cli
from .inference.base import model_name_of
from .inference.check import DecisionCheck, Settler
from .inference.factory import BACKENDS, artefact_kind, create_runner, resolve
from .inference.tta import MAX_TTA, view_probabilities
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
)
from .precision import AUTOCAST_PRECISIONS, parse_precision
from .storage import atomic_path, atomic_write_json, claim_output_dir, file_sha256, staged_outputs

__all__ = ['REPORT_FORMAT', 'EvalConfig', 'evaluate', 'evaluate_split', 'build_parser', 'main']

REPORT_FORMAT = 'timm-inception-pcam-report/1'
TTA_GAIN_KEYS = ('roc_auc', 'accuracy', 'f1', 'balanced_accuracy', 'nll', 'ece')
OUTPUT_NAMES = ('report.json', 'predictions.csv', 'roc.png', 'pr.png', 'confusion.png')
PLOTS = {'roc': 'roc.png', 'pr': 'pr.png', 'confusion': 'confusion.png'}
PROB_FORMAT = '%.17g'  # float64 round-trips


@dataclasses.dataclass
class EvalConfig:
    """What to evaluate and how: the command line's options, typed (see `build_parser` for their meaning)."""
    checkpoint: str
    data_dir: str
    model: str | None = None
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    use_ema: bool = False
    split: str = 'test'
    tta: int = 1
    threshold_from: str = 'valid'
    threshold_method: str = 'youden'
    batch_size: int = 256
    workers: int = 2
    output: str = 'runs/evaluate'
    device: str | None = None
    precision: str = 'auto'
    backend: str = 'auto'
    bootstrap: int = 1000
    seed: int = 0
    limit: int | None = None
    overwrite: bool = False

    def check(self) -> 'EvalConfig':
        """Range-check the numbers and fold the precision's aliases; UsageError on a bad value."""
        check_range('--tta', self.tta, 1, MAX_TTA)
        check_range('--batch-size', self.batch_size, 1)
        check_range('--workers', self.workers, 0, MAX_WORKERS)
        check_range('--seed', self.seed, 0, MAX_SEED)
        check_range('--bootstrap', self.bootstrap, 1)
        check_range('--limit', self.limit, 1)
        if self.threshold_method not in THRESHOLD_METHODS:
            raise UsageError(f'--threshold-method {self.threshold_method!r}: expected one of '
                             f'{", ".join(THRESHOLD_METHODS)}')
        if self.threshold_from not in ('valid', 'default'):
            raise UsageError(f'--threshold-from {self.threshold_from!r}: expected valid or default')
        if self.backend not in ('auto', *BACKENDS):
            raise UsageError(f'--backend {self.backend!r}: expected auto or one of {", ".join(BACKENDS)}')
        self.precision = parse_precision(self.precision, AUTOCAST_PRECISIONS, '--precision')
        return self


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


def _open_evaluated_split(data_dir: str | Path, split: str) -> PCamDataset:
    try:
        return _open_split(data_dir, split)
    except FileNotFoundError as e:
        raise DataError(str(e)) from e


def _write_predictions(path: Path, labels: np.ndarray, probs: np.ndarray, threshold: float,
                       plain: np.ndarray | None) -> None:
    cols = [np.arange(labels.size), labels, probs, (probs >= threshold).astype(np.int64)]
    # PROB_FORMAT: the probabilities exactly (rounded to 6 decimals, the file could not reproduce report.json's
    # figures, and a printed prob could sit on the other side of the threshold from its pred)
    header, fmt = 'index,label,prob,pred', ['%d', '%d', PROB_FORMAT, '%d']
    if plain is not None:
        cols.append(plain)
        header, fmt = header + ',prob_no_tta', fmt + [PROB_FORMAT]
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
            plain_at = threshold if plain_threshold is None else plain_threshold
            plain = compute_metrics(labels, views[0], plain_at)
        without = {k: plain[k] for k in TTA_GAIN_KEYS}
        out['tta_gain'] = {'without_tta': without, 'delta': {k: metrics[k] - without[k] for k in TTA_GAIN_KEYS},
                           'without_tta_threshold': plain_at}
    return out


def _threshold(cfg: EvalConfig, predict: Callable[[PCamDataset, str], np.ndarray],
               split_views: tuple[np.ndarray, np.ndarray, Settler | None] | None,
               settler_for: Callable[[PCamDataset, np.ndarray], Settler] | None = None,
               ) -> tuple[dict[str, Any], float | None, int | None]:
    """({'value', 'source', 'method'[, 'valid_settled']}, threshold for the plain view, number of valid items used).

    With `settler_for` (the `bf16_checked` backend) the thresholds are `Settler.choose`n: float32's choice.
    """
    default = {'value': 0.5, 'source': 'default', 'method': None}
    if cfg.threshold_from == 'default':
        return default, None, None

    def fallback(reason: str) -> tuple[dict[str, Any], None, None]:
        warnings.warn(f'{reason}: using 0.5', stacklevel=3)
        return {**default, 'fallback': reason}, None, None

    if split_views is not None:  # evaluating valid itself
        labels, views, settler = split_views
    else:
        try:
            valid = _open_split(cfg.data_dir, 'valid')
        except FileNotFoundError as e:
            files = split_paths(cfg.data_dir, 'valid')
            if any(p.exists() or p.with_name(p.name + '.gz').exists() for p in (files['x'], files['y'])):
                raise DataError(f'{e} (the valid split is incomplete: the threshold is chosen on it; add the '
                                f'file, or pass --threshold-from default)') from None
            return fallback(f'no valid split to choose the threshold on ({e})')
        views = predict(valid, 'valid')
        labels = valid.labels[:views.shape[1]]
        settler = settler_for(valid, views) if settler_for is not None else None

    def choose(plain: bool) -> float:
        if settler is not None:
            return settler.choose(labels, cfg.threshold_method, plain)
        return select_threshold(labels, views[0] if plain else views.mean(axis=0), cfg.threshold_method)

    try:
        chosen: dict[str, Any] = {'value': choose(False), 'source': 'valid', 'method': cfg.threshold_method}
        plain = choose(True) if views.shape[0] > 1 else None
    except ValueError as e:
        return fallback(f'valid split unusable for threshold selection ({e})')
    if settler is not None:
        chosen['valid_settled'] = settler.settled
    return chosen, plain, int(labels.size)


def _fmt(v: float | None) -> str:
    return 'nan' if v is None else f'{v:.4f}'


def _print_table(report: dict[str, Any]) -> None:
    m, ci, thr = report['metrics'], report['ci95'], report['threshold']
    gain = (report['tta_gain'] or {}).get('delta', {})
    print(f"\n{report['model']} on {report['split']} (n={report['n']}, tta={report['tta']}, "
          f"threshold {thr['value']:.4f} from {thr['source']}{', ' + thr['method'] if thr['method'] else ''}"
          f"{'; ' + thr['fallback'] if thr.get('fallback') else ''})")
    print(f"{'metric':<18} {'value':>8}  {'95% CI':<19} {'TTA gain' if gain else ''}")
    for k in ('roc_auc', 'accuracy', 'balanced_accuracy', 'f1', 'weighted_f1', 'precision', 'recall',
              'average_precision', 'nll', 'ece', 'tpr', 'fpr'):
        v = m[k]
        lo_hi = f'[{ci[k][0]:.4f}, {ci[k][1]:.4f}]' if k in ci and ci[k][0] is not None else ''
        g = f'{gain[k]:+.4f}' if gain.get(k) is not None else ''
        print(f"{k:<18} {_fmt(v):>8}  {lo_hi:<19} {g}")
    print(f"confusion          TP {m['tp']}  FP {m['fp']}  TN {m['tn']}  FN {m['fn']}")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog='python -m timm_inception_pcam.evaluate', description=__doc__.split('\n')[0])
    p.add_argument('--checkpoint', required=True,
                   help="what to score: our checkpoint, timm train.py's .pth.tar, a .safetensors file, "
                        "hf-hub:org/name, an .onnx file (FP32 or FP16) or a TensorRT .plan")
    p.add_argument('--model', default=None, help='model name (default: the architecture stored in the checkpoint)')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ModelKwargsAction, help='e.g. depths=1,1,1')
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
    p.add_argument('--device', default=None, choices=('cpu', 'cuda'),
                   help='default: cuda when available for a checkpoint or plan; an ONNX file runs on the CPU')
    p.add_argument('--precision', default=None, metavar='{auto,fp32,bf16,fp16}',
                   help="auto (default): the backend's own (float32 decisions on the CPU, fp32 on CUDA); "
                        'bf16 / fp16 autocast on CUDA; an ONNX file or plan runs at its own precision')
    p.add_argument('--amp', default=None, metavar='{bf16,fp16,none}',
                   help='deprecated alias of --precision (none = fp32)')
    p.add_argument('--backend', default='auto', choices=('auto', *BACKENDS),
                   help='inference engine (timm_inception_pcam.inference). auto: openvino_bf16_checked (or '
                        'bf16_checked without OpenVINO; never the int8 cascade here) on CPUs with AMX or '
                        'AVX-512 BF16 (bf16, '
                        'with float32 for every patch that could change the choice of the threshold or a decision '
                        'at it), else channels_last (float32, BatchNorm folded); eager on CUDA; onnxruntime for an '
                        '.onnx file, tensorrt for a .plan; eager = the model as it is')
    p.add_argument('--bootstrap', type=int, default=1000, help='bootstrap resamples for the 95%% CIs')
    p.add_argument('--seed', type=int, default=0, help='bootstrap seed')
    p.add_argument('--limit', type=int, default=None, help='evaluate only the first N patches of each split')
    p.add_argument('--overwrite', action='store_true', help='replace the finished evaluation in --output')
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The typed config of parsed arguments; `--amp` (deprecated) maps onto `--precision`."""
    precision = args.precision
    if args.amp is not None:
        amp = parse_precision(args.amp, AUTOCAST_PRECISIONS, '--amp')
        if precision is not None and parse_precision(precision, AUTOCAST_PRECISIONS, '--precision') != amp:
            raise UsageError(f'--amp {args.amp} and --precision {precision} disagree: give --precision only')
        warnings.warn('--amp is deprecated: use --precision (none = fp32)', DeprecationWarning, stacklevel=2)
        precision = amp
    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    return EvalConfig(**{**values, 'precision': precision or 'auto'}).check()


def _backend(cfg: EvalConfig, kind: str, device: str) -> str:
    """`cfg.backend`, with `auto` for a checkpoint resolved here, so that it never becomes the int8 cascade (as the
    factory's `auto` does once a model's int8 is cached): ROC AUC, AP, NLL and ECE come from the fast path's
    probabilities, and only bf16's error on them is known to be small. An int8 model that quantised badly changed a
    benchmark model's AUC by -0.32 with every decision still float32's. `--backend openvino_cascade` runs it."""
    if cfg.backend != 'auto' or kind != 'checkpoint':
        return cfg.backend
    return resolve('auto', 'module', device, cfg.precision)[0]


def _load(cfg: EvalConfig):
    """(what create_runner takes, its kind): the loaded model for a checkpoint, the path for a file."""
    kind = artefact_kind(cfg.checkpoint)
    if kind != 'checkpoint':
        if cfg.use_ema or cfg.model_kwargs:
            article = 'an' if kind[0] in 'aeiou' else 'a'
            raise UsageError(f'{cfg.checkpoint}: --use-ema and --model-kwargs apply to checkpoints, not to {article} '
                             f'{kind} file (its weights and architecture are fixed)')
        return cfg.checkpoint, kind
    model = load_model(cfg.model, cfg.checkpoint, use_ema=cfg.use_ema, **cfg.model_kwargs)
    _check_classes(cfg, int(getattr(model, 'num_classes', PCAM_NUM_CLASSES)))
    return model, kind


def _check_classes(cfg: EvalConfig, n_classes: int) -> None:
    if n_classes != PCAM_NUM_CLASSES:
        raise CheckpointError(f'{cfg.checkpoint}: model has {n_classes} classes, expected {PCAM_NUM_CLASSES} '
                              f'({", ".join(LABEL_NAMES)})')


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Score `cfg.checkpoint` on one split and write report.json, predictions.csv and the plots; returns the report."""
    t0 = time.perf_counter()
    try:
        split = normalize_split(cfg.split)
    except ValueError as e:
        raise UsageError(str(e)) from e
    dataset = _open_evaluated_split(cfg.data_dir, split)  # fail on a missing split before loading any weights
    artefact, kind = _load(cfg)
    device = cfg.device or 'auto'
    # One run owns the folder, and its files appear together when it completes, report.json last: a folder never
    # pairs one run's report with another's predictions or plots, and a failed or killed run (even with
    # --overwrite) leaves the previous run's files as they were.
    with claim_output_dir(cfg.output, overwrite=cfg.overwrite, finished=('report.json',)), \
            staged_outputs(cfg.output, last='report.json', stale=OUTPUT_NAMES) as staging:
        # No per-batch thresholds: the threshold is chosen later, and `Settler` settles what depends on it.
        runner = create_runner(artefact, _backend(cfg, kind, device), device, cfg.precision, cfg.batch_size,
                               thresholds=())
        try:
            report = _evaluate(cfg, split, dataset, runner, artefact, kind, t0, staging)
        finally:
            runner.close()
    _print_table(report)
    m = report['metrics']
    print(f"evaluate: {report['model']} on {split} (n={report['n']}, tta={cfg.tta}): ROC AUC {_fmt(m['roc_auc'])}, "
          f"accuracy {_fmt(m['accuracy'])}, F1 {_fmt(m['f1'])} at threshold {report['threshold']['value']:.4f} "
          f"({report['threshold']['source']}) -> {Path(cfg.output) / 'report.json'}")
    return report


def _evaluate(cfg: EvalConfig, split: str, dataset: PCamDataset, runner: Any, artefact: Any, kind: str,
              t0: float, out: Path) -> dict[str, Any]:
    """Score, choose the threshold, and write the report, predictions and plots into `out`; returns the report."""
    spec = runner.spec
    _check_classes(cfg, len(spec.label_names))
    model_name = (model_name_of(artefact) if kind == 'checkpoint' else spec.extra.get('model')) or cfg.model
    check = runner if isinstance(runner, DecisionCheck) else None

    def predict(ds: PCamDataset, name: str) -> np.ndarray:
        views = view_probabilities(runner, ds, cfg.batch_size, cfg.tta, workers=cfg.workers, limit=cfg.limit,
                                   desc=f'{name} x{cfg.tta}')
        bad = ~np.isfinite(views).all(axis=0)
        if bad.any():
            raise InferenceError(f'{cfg.checkpoint}: the model\'s outputs are not finite (NaN or inf) for '
                                 f'{int(bad.sum())} of {bad.size} {name} patches (first: patch '
                                 f'{int(np.argmax(bad))}); its weights are broken or overflow at precision '
                                 f'{spec.precision}')
        return views

    views = predict(dataset, split)
    labels = np.asarray(dataset.labels[:views.shape[1]], dtype=np.int64)
    # bf16_checked: float32 wherever bf16 could change the threshold's choice or a counted decision
    settler_for = functools.partial(Settler, check, batch_size=cfg.batch_size) if check is not None else None
    settler = settler_for(dataset, views) if settler_for is not None else None
    threshold, plain_threshold, valid_n = _threshold(cfg, predict, (labels, views, settler) if split == 'valid'
                                                     else None, settler_for)
    backend_check = None
    if settler is not None:
        settler.at(threshold['value'])
        if plain_threshold is not None:
            settler.at(plain_threshold, plain=True)
        backend_check = {**settler.check.stats(), 'settled': settler.settled, 'settled_at': threshold['value'],
                         'valid_settled': threshold.pop('valid_settled', None),
                         'rescored': {r.spec.backend: n
                                      for r, n in zip(settler.check.stages[1:], settler.rescored[1:])}}
    result = evaluate_split(labels, views, threshold['value'], plain_threshold, cfg.bootstrap, cfg.seed)

    probs = views.mean(axis=0)
    _write_predictions(out / 'predictions.csv', labels, probs, threshold['value'], views[0] if cfg.tta > 1 else None)
    plot_roc(labels, probs, out / PLOTS['roc'], threshold['value'], title=f'ROC, {model_name}, {split}')
    plot_pr(labels, probs, out / PLOTS['pr'], threshold['value'], title=f'Precision-recall, {model_name}, {split}')
    plot_confusion(labels, probs, out / PLOTS['confusion'], threshold['value'], LABEL_NAMES)
    path = str(cfg.checkpoint)
    sha256 = file_sha256(path) if Path(path).is_file() else None
    report = _finite({
        'format': REPORT_FORMAT,
        'model': model_name,
        'checkpoint': path,
        'checkpoint_sha256': sha256,
        'artefact': {'path': path, 'sha256': sha256, 'kind': kind, 'backend': spec.backend,
                     'precision': spec.precision, 'device': spec.device,
                     'source_checkpoint_sha256': spec.extra.get('checkpoint_sha256'), 'runner': spec.to_dict()},
        'split': split,
        'n': int(labels.size),
        'tta': cfg.tta,
        'threshold': {**threshold, 'valid_n': valid_n},
        'metrics': result['metrics'],
        'ci95': result['ci95'],
        'tta_gain': result['tta_gain'],
        'plots': dict(PLOTS),
        'predictions': 'predictions.csv',
        'curves': result['curves'],
        'bootstrap': {'n_resamples': cfg.bootstrap, 'seed': cfg.seed, 'method': 'percentile'},
        'normalization': {'mean': list(spec.mean), 'std': list(spec.std)},
        'data_dir': str(cfg.data_dir),
        'data': _data_record(cfg.data_dir, split),
        'use_ema': cfg.use_ema,
        'precision': spec.precision,
        'backend': spec.backend,
        'backend_check': backend_check,
        'versions': {'timm': timm.__version__, 'torch': torch.__version__},
        'seconds': round(time.perf_counter() - t0, 2),
    })
    atomic_write_json(out / 'report.json', report)
    return report


def _data_record(data_dir: str | Path, split: str) -> dict[str, Any]:
    """Where the scored patches came from: 'synthetic' (written by synth), 'pcam' (official, md5-verified) or
    'unknown'; the Hub folder never presents a result on synthetic or unknown data as a PCam result."""
    prov = folder_provenance(data_dir, tuple(dict.fromkeys((split, 'valid'))))
    note = {'synthetic': 'synthetic patches in the PCam layout: not a PCam result',
            'unknown': 'official md5s not verified (python -m timm_inception_pcam.data info --verify)'}
    return {'dir': str(data_dir), **prov, 'note': note.get(prov['provenance'], 'official PCam files (md5-verified)')}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line and run `evaluate`; returns the report (also written to <output>/report.json)."""
    return evaluate(config_from_args(build_parser().parse_args(argv)))


if __name__ == '__main__':
    sys.exit(cli(main, 'evaluate'))
