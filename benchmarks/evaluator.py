"""The evaluator end to end, eager float32 vs `auto`: seconds, and whether the threshold and counts are float32's.

`timm_inception_pcam.evaluate` scores the test split with the threshold chosen on valid (TTA 1, its other options at
their defaults), twice on the same trained checkpoint and synthetic PCam files: `--backend eager` and
`--backend auto`. Everything the command does is timed: loading, reading, inference, settling, bootstrap, plots and
the report. The target (issue 14): `auto` at least 4x eager with the same threshold and confusion matrix.
"""
from __future__ import annotations

import contextlib
import io
import time
import warnings
from pathlib import Path
from typing import Any

from .common import Sizes, trained_checkpoint

__all__ = ['SPEEDUP_TARGET', 'BACKENDS', 'run', 'markdown']

SPEEDUP_TARGET = 4.0
BACKENDS = ('eager', 'auto')
COUNTS = ('tp', 'fp', 'tn', 'fn')
# The threshold is a valid patch's probability: two float32 engines (eager torch, OpenVINO f32) give it to about
# 1e-7, not bit for bit. The same threshold means the same up to this, and the same decisions (the counts).
THRESHOLD_ATOL = 1e-5


def _evaluate(checkpoint: Path, data: Path, output: Path, backend: str) -> tuple[dict[str, Any], float]:
    from timm_inception_pcam.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(checkpoint=str(checkpoint), data_dir=str(data), split='test', tta=1, output=str(output),
                     device='cpu', backend=backend, overwrite=True)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        report = evaluate(cfg.check())
    return report, time.perf_counter() - t0


def bench_model(name: str, sizes: Sizes, workdir: Path, data: Path, cache_dir: Path | None,
                progress: bool) -> dict[str, Any]:
    checkpoint, source = trained_checkpoint(name, sizes, workdir, cache_dir, progress)
    runs: dict[str, dict[str, Any]] = {}
    for backend in BACKENDS:
        report, seconds = _evaluate(checkpoint, data, workdir / f'eval-{name}-{backend}', backend)
        check = report.get('backend_check') or {}
        runs[backend] = {'backend': report['backend'], 'seconds': seconds, 'threshold': report['threshold']['value'],
                         'confusion': {k: report['metrics'][k] for k in COUNTS},
                         'roc_auc': report['metrics']['roc_auc'], 'n_test': report['n'],
                         'n_valid': report['threshold'].get('valid_n'),
                         'settled_test': check.get('settled'), 'settled_valid': check.get('valid_settled'),
                         'rechecked_warmup': check.get('rechecked'),
                         'conversion_cached': report['artefact']['runner']['extra'].get('cache_hit')}
    eager, auto = runs['eager'], runs['auto']
    speedup = eager['seconds'] / auto['seconds']
    threshold_diff = abs(auto['threshold'] - eager['threshold'])
    same = threshold_diff <= THRESHOLD_ATOL and auto['confusion'] == eager['confusion']
    return {'model': name, 'model_source': source, 'runs': runs, 'speedup': speedup,
            'threshold_abs_diff': threshold_diff, 'same_threshold_and_confusion': same,
            'roc_auc_change': None if eager['roc_auc'] is None or auto['roc_auc'] is None
            else auto['roc_auc'] - eager['roc_auc'],
            'target': {'speedup': SPEEDUP_TARGET, 'met': bool(speedup >= SPEEDUP_TARGET and same),
                       'applies': not sizes.quick}}


def run(sizes: Sizes, workdir: Path, cache_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Both backends on every benchmark model, on synthetic valid and test splits of `sizes.n_eval` patches each."""
    from timm_inception_pcam.data import synthesize_pcam

    data = workdir / 'data'
    synthesize_pcam(data, n=16, seed=1, n_valid=sizes.n_eval, n_test=sizes.n_eval)
    return {'n_valid': sizes.n_eval, 'n_test': sizes.n_eval, 'speedup_target': SPEEDUP_TARGET,
            'models': [bench_model(name, sizes, workdir, data, cache_dir, progress) for name in sizes.backend_models]}


def markdown(section: dict[str, Any], fmt) -> list[str]:
    lines = [f'`python -m timm_inception_pcam.evaluate` end to end (threshold chosen on {section["n_valid"]} valid '
             f'patches, {section["n_test"]} test patches scored, TTA 1, defaults otherwise) on synthetic PCam-format '
             f'files: eager float32 vs `auto` (target {fmt(section["speedup_target"])}x with float32\'s threshold and '
             'confusion matrix).', '',
             '| model | backend | seconds | vs eager | threshold | TP / FP / TN / FN | ROC AUC | '
             'settled valid / test |',
             '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for m in section['models']:
        eager_s = m['runs']['eager']['seconds']
        for r in m['runs'].values():
            c = r['confusion']
            settled = '-' if r['settled_valid'] is None else f'{fmt(r["settled_valid"])} / {fmt(r["settled_test"])}'
            lines.append(f'| {m["model"]} | {r["backend"]} | {fmt(r["seconds"])} | {fmt(eager_s / r["seconds"])} | '
                         f'{r["threshold"]:.6f} | {c["tp"]} / {c["fp"]} / {c["tn"]} / {c["fn"]} | '
                         f'{fmt(r["roc_auc"])} | {settled} |')
    lines += [''] + [f'{m["model"]}: auto {fmt(m["speedup"])}x eager; threshold '
                     f'{"and confusion matrix the same" if m["same_threshold_and_confusion"] else "or counts DIFFER"} '
                     f'(threshold difference {fmt(m["threshold_abs_diff"])}, float32 engines agree to about 1e-7); '
                     f'ROC AUC change {fmt(m["roc_auc_change"])}.' for m in section['models']]
    return lines + ['']
