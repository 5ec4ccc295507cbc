"""The README's main job: the whole pipeline on a synthetic PCam sample, on CPU, in a few minutes.

    python -m timm_inception_pcam.pipeline --output runs/demo

1. synthesize a PCam-format sample (official file names, keys, shapes, dtypes, meta CSVs);
2. train `inception_v4_pcam` briefly with our trainer (reads the HDF5 files directly);
3. evaluate on the test split: metrics with 95 % CIs, ROC / PR / confusion plots, report.json;
4. export: single-file ONNX with parity, FP16 ONNX with its parity report, and the TensorRT step, which on a
   machine without a GPU stops with the command that finishes it;
5. prepare the Hugging Face Hub folder (dry run) and print the command that would upload it.

Each step is the project's own command called with its Python entry point, so the pipeline is exactly what a user
would run by hand, step by step.
"""
import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from timm.utils import ParseKwargs

__all__ = ['build_parser', 'train_model', 'main']


def _step(title: str) -> None:
    print(f'\n=== {title} ===', flush=True)


def _kwargs_argv(model_kwargs: dict[str, Any]) -> list[str]:
    if not model_kwargs:
        return []
    values = [f'{k}={",".join(map(str, v)) if isinstance(v, (list, tuple)) else v}' for k, v in model_kwargs.items()]
    return ['--model-kwargs', *values]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m timm_inception_pcam.pipeline', description=__doc__.split('\n\n')[0])
    p.add_argument('--output', default='runs/demo', help='folder for every artefact of the run')
    p.add_argument('--model', default='inception_v4_pcam')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='architecture arguments, e.g. depths=1,1,1 for a quick reduced-depth run')
    p.add_argument('--n-train', type=int, default=512, help='synthetic training patches')
    p.add_argument('--n-eval', type=int, default=256, help='synthetic validation and test patches (each)')
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--tta', type=int, default=1,
                   help='test-time augmentation views in the evaluation (1 = off; 8 = all dihedral views, 8x the time)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--repo-id', default='timm-inception-pcam/inception_v4_pcam-synthetic-demo',
                   help='Hub repo the prepared folder is meant for (nothing is uploaded)')
    p.add_argument('--no-export', action='store_true', help='skip the ONNX / FP16 / TensorRT step')
    return p


def train_model(args: argparse.Namespace, data_dir: Path, output: Path, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Step 2, the main job's recipe: our trainer from random initialisation (no network) on `data_dir`.

    `args` are this command's (`build_parser`); the benchmark trains its models with it too. Returns the trainer's
    summary (``best_checkpoint``, history, ...). `extra`: further trainer arguments (e.g. ``--no-progress``).
    """
    from .train import main as train_main

    return train_main([
        '--model', args.model, *_kwargs_argv(args.model_kwargs), '--data-dir', str(data_dir), '--output', str(output),
        '--epochs', str(args.epochs), '--batch-size', str(args.batch_size), '--lr', str(args.lr),
        '--warmup-epochs', '0.5', '--seed', str(args.seed), '--workers', str(args.workers), '--no-pretrained',
        *extra,
    ])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from export.trt import main as trt_main

    from .data import synthesize_pcam
    from .evaluate import main as evaluate_main
    from .publish import main as publish_main

    args = build_parser().parse_args(argv)
    out = Path(args.output)
    started = time.monotonic()
    kwargs_argv = _kwargs_argv(args.model_kwargs)
    artefacts: dict[str, Any] = {}

    _step('1/5 synthetic PCam sample')
    data_dir = out / 'data'
    files = synthesize_pcam(data_dir, n=args.n_train, seed=args.seed, n_valid=args.n_eval, n_test=args.n_eval)
    artefacts['data'] = str(data_dir)
    print(f'{len(files)} files in {data_dir}')

    _step(f'2/5 training {args.model} on CPU')
    train = train_model(args, data_dir, out / 'train')
    checkpoint = Path(train['best_checkpoint'])
    artefacts['checkpoint'] = str(checkpoint)

    _step('3/5 evaluation on the test split (threshold chosen on valid)')
    eval_dir = out / 'evaluate'
    report = evaluate_main([
        '--checkpoint', str(checkpoint), '--data-dir', str(data_dir), '--split', 'test', '--tta', str(args.tta),
        '--threshold-from', 'valid', '--output', str(eval_dir), '--workers', str(args.workers),
    ])
    report_path = eval_dir / 'report.json'
    artefacts['report'] = str(report_path)
    artefacts['plots'] = {k: str(eval_dir / v) for k, v in report['plots'].items()}

    onnx_path = None
    if not args.no_export:
        _step('4/5 export: ONNX, FP16 ONNX, parity reports, TensorRT')
        export_dir = out / 'export'
        status = trt_main([  # without a GPU it says what is missing and how to finish, and returns non-zero
            '--model', args.model, *kwargs_argv, '--checkpoint', str(checkpoint), '--output', str(export_dir),
            '--data-dir', str(data_dir), '--fp16',
        ])
        artefacts['export'] = str(export_dir)
        artefacts['tensorrt'] = 'engine built' if status == 0 else f'not built here (exit {status}; see above)'
        onnx_files = sorted(p for p in export_dir.glob('*.onnx') if 'fp16' not in p.name)
        onnx_path = onnx_files[0] if onnx_files else None

    _step('5/5 Hugging Face Hub folder (dry run)')
    publish = publish_main([
        '--checkpoint', str(checkpoint), '--report', str(report_path), '--repo-id', args.repo_id,
        '--plots-dir', str(eval_dir), '--output', str(out / 'hub'), '--dry-run',
        *(['--onnx', str(onnx_path)] if onnx_path else []),
    ])
    artefacts['hub_folder'] = str(publish['folder'])
    artefacts['upload_command'] = publish.get('upload_command')

    metrics = report['metrics']
    summary = {
        'output': str(out), 'seconds': round(time.monotonic() - started, 1), 'artefacts': artefacts,
        'test': {k: metrics[k] for k in ('roc_auc', 'accuracy', 'f1', 'balanced_accuracy')},
        'best_val_roc_auc': train.get('best_metric'),
    }
    with open(out / 'pipeline.json', 'w') as f:
        json.dump(summary, f, indent=2)

    _step('artefacts')
    for key, value in artefacts.items():
        print(f'{key:>15}: {json.dumps(value) if isinstance(value, dict) else value}')
    if artefacts.get('upload_command'):
        cmd = artefacts['upload_command']
        print(f'\nTo publish for real: {cmd if isinstance(cmd, str) else shlex.join(cmd)}')
    print(f'\nDone in {summary["seconds"]:.0f} s: test ROC AUC {metrics["roc_auc"]:.3f}, accuracy '
          f'{metrics["accuracy"]:.3f}, F1 {metrics["f1"]:.3f} (synthetic data, {args.epochs} epochs on CPU)')
    return summary


if __name__ == '__main__':
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
