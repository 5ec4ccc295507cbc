"""Learning curves of the registered full-size models on synthetic PCam (slow; not part of the test suite).

    python -m benchmarks.train_curve --output benchmarks/results/train_curve [--n 2048 --epochs 6 ...]

Synthesizes a PCam-format set (unless --data-dir is given), trains `inception_v4_pcam` and
`inception_resnet_v2_pcam` at their paper depths with `timm_inception_pcam.train` (random initialisation, no
network), and records the validation ROC AUC and training loss after every short epoch to `train_curve.json` and
`train_curve.png`.
"""
from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from timm_inception_pcam.errors import ArgumentParser
from timm_inception_pcam.storage import atomic_path, atomic_write_json
from timm_inception_pcam.train import TrainConfig, train

MODELS = ('inception_v4_pcam', 'inception_resnet_v2_pcam')


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--output', default='benchmarks/results/train_curve')
    p.add_argument('--data-dir', default=None, help='PCam files to use instead of a synthetic set')
    p.add_argument('--model', nargs='+', default=list(MODELS))
    p.add_argument('--n', type=int, default=2048, help='synthetic training patches (validation: n // 4)')
    p.add_argument('--epochs', type=int, default=6)
    p.add_argument('--steps-per-epoch', type=int, default=16, help='updates between two points of the curve')
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--limit-val', type=int, default=512)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--workers', type=int, default=0)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--amp-dtype', default='auto')
    return p.parse_args(argv)


def plot(curves: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax_auc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for name, run in curves.items():
        hist = run['history']
        updates = [row['updates'] for row in hist]
        (line,) = ax_auc.plot(updates, [row['val_roc_auc'] for row in hist], marker='o', label=name)
        if 'ema_val_roc_auc' in hist[0]:
            ax_auc.plot(updates, [row['ema_val_roc_auc'] for row in hist], ls='--', color=line.get_color(),
                        label=f'{name} (EMA)')
        ax_loss.plot(updates, [row['train_loss'] for row in hist], marker='o', color=line.get_color(), label=name)
    ax_auc.set(xlabel='updates', ylabel='validation ROC AUC', ylim=(0.0, 1.0), title='validation ROC AUC')
    ax_loss.set(xlabel='updates', ylabel='training loss (label smoothing 0.1)', title='training loss')
    for ax in (ax_auc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix='.png') as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.output)
    data_dir = Path(args.data_dir) if args.data_dir else out / 'data'
    if args.data_dir is None and not (data_dir / 'camelyonpatch_level_2_split_valid_y.h5').is_file():
        from timm_inception_pcam.data import synthesize_pcam

        print(f'synthesizing {args.n} + {args.n // 4} patches in {data_dir}', flush=True)
        synthesize_pcam(data_dir, args.n, seed=args.seed, n_valid=max(2, args.n // 4), n_test=16)
    curves: dict[str, dict[str, Any]] = {}
    for name in args.model:
        run_dir = out / 'runs' / f'{name}-{time.strftime("%Y%m%d-%H%M%S")}'
        t0 = time.perf_counter()
        summary = train(TrainConfig(
            model=name, data_dir=data_dir, output=run_dir, pretrained=False, epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, limit_val=args.limit_val, lr=args.lr,
            warmup_epochs=1, workers=args.workers, seed=args.seed, precision=args.amp_dtype))
        curves[name] = {'seconds': round(time.perf_counter() - t0, 1), 'best_metric': summary.best_metric,
                        'best_epoch': summary.best_epoch,
                        'best_checkpoint': str(summary.best_checkpoint) if summary.best_checkpoint else None,
                        'history': summary.history}
    report = {
        'format': 'timm-inception-pcam-train-curve/1',
        'config': {k: v for k, v in vars(args).items() if k != 'output'},
        'machine': {'python': platform.python_version(), 'torch': torch.__version__, 'cpu': platform.processor(),
                    'threads': torch.get_num_threads(), 'cuda': torch.cuda.is_available()},
        'models': curves,
    }
    atomic_write_json(out / 'train_curve.json', report)
    plot(curves, out / 'train_curve.png')
    best = ', '.join(f'{n} AUC {c["best_metric"]:.4f} in {c["seconds"]:.0f} s' for n, c in curves.items())
    print(f'train curve: {best} -> {out / "train_curve.json"}, {out / "train_curve.png"}')
    return report


if __name__ == '__main__':
    import logging

    logging.basicConfig(level=logging.INFO, format='%(message)s')
    main()
