"""The README's main job: the whole pipeline on a synthetic PCam sample, on CPU, in a few minutes.

    python -m timm_inception_pcam.pipeline --output runs/demo [--overwrite]

1. synthesize a PCam-format sample (official file names, keys, shapes, dtypes, meta CSVs);
2. train `inception_v4_pcam` briefly with our trainer (reads the HDF5 files directly);
3. evaluate on the test split: metrics with 95 % CIs, ROC / PR / confusion plots, report.json;
4. export: single-file ONNX with parity, FP16 ONNX with its parity report, and the TensorRT step, which on a
   machine without a GPU stops with the command that finishes it; an OpenVINO IR with its parity report, and a
   Triton Inference Server model repository (ONNX and OpenVINO models taking raw uint8 patches);
5. prepare the Hugging Face Hub folder (dry run) and print the command that would upload it.

Each step calls the project's own function for it, with the arguments a user would give the step's command. A
folder holding a previous run is refused unless `--overwrite` replaces it.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import ModelKwargsAction
from .constants import MAX_SEED, MAX_WORKERS
from .errors import ArgumentParser, UsageError, check_range
from .storage import atomic_write_json, claim_output_dir, remove_path
from .train import TrainConfig, TrainResult, train
from .train.model import create_train_model

__all__ = ['PipelineConfig', 'train_config', 'run_pipeline', 'build_parser', 'main', 'RUN_ENTRIES']

_logger = logging.getLogger(__name__)
# What a pipeline run writes in its folder (all of it is replaced by --overwrite); pipeline.json comes last.
STARTED = '.pipeline.started'  # present from a run's start until its pipeline.json is written
RUN_ENTRIES = ('pipeline.json', 'data', 'train', 'evaluate', 'export', 'hub', STARTED)


@dataclass
class PipelineConfig:
    """The main job's choices; the command line's options under the same names."""
    output: Path = Path('runs/demo')
    model: str = 'inception_v4_pcam'
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    n_train: int = 512
    n_eval: int = 256
    epochs: int = 2
    batch_size: int = 32
    lr: float = 2e-3
    tta: int = 1
    seed: int = 0
    workers: int = 2
    repo_id: str = 'your-hf-user/inception_v4_pcam-synthetic-demo'  # not the project's org: a user's demo upload
    export: bool = True
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        check_range('--n-train', self.n_train, 2)
        check_range('--n-eval', self.n_eval, 2)
        check_range('--tta', self.tta, 1, 8)
        check_range('--workers', self.workers, 0, MAX_WORKERS)
        check_range('--seed', self.seed, 0, MAX_SEED)
        check_range('--batch-size', self.batch_size, 1)
        if self.n_train < self.batch_size:
            raise UsageError(f'--n-train {self.n_train} makes no full batch of --batch-size {self.batch_size}: raise '
                             f'--n-train or lower --batch-size')
        from .hub.report import check_repo_id

        check_repo_id(self.repo_id)  # the Hub folder is step 5: a name the Hub refuses is found before step 1


def train_config(cfg: PipelineConfig, data_dir: Path, output: Path, **over: Any) -> TrainConfig:
    """Step 2, the main job's recipe: our trainer from random initialisation (no network) on `data_dir`.

    The benchmark trains its models with it too; `over` replaces fields (e.g. progress=False).
    """
    return TrainConfig(**{
        'data_dir': data_dir, 'output': output, 'model': cfg.model, 'model_kwargs': dict(cfg.model_kwargs),
        'epochs': cfg.epochs, 'batch_size': cfg.batch_size, 'lr': cfg.lr, 'warmup_epochs': 0.5, 'seed': cfg.seed,
        'workers': cfg.workers, 'pretrained': False, 'progress': cfg.progress, **over})


# ----------------------------------------------------------------------------------------------- the other steps
# Each of these is the one place the pipeline calls another command's code: re-point them here when evaluate,
# export and publish gain typed cores.


def _evaluate_step(checkpoint: Path, data_dir: Path, output: Path, tta: int, workers: int) -> dict[str, Any]:
    """Step 3: the evaluator's report on the test split, threshold chosen on valid, on the CPU's `auto` path."""
    from .evaluate import EvalConfig, evaluate

    return evaluate(EvalConfig(checkpoint=str(checkpoint), data_dir=str(data_dir), split='test', tta=tta,
                               threshold_from='valid', output=str(output), workers=workers).check())


def _export_step(model: str, model_kwargs: dict[str, Any], checkpoint: Path, data_dir: Path, output: Path
                 ) -> tuple[int, Path | None]:
    """Step 4: export.trt's ONNX + FP16 + TensorRT chain; (exit status, fp32 ONNX file or None). Without a GPU the
    TensorRT part says what is missing and how to finish, and the status is non-zero."""
    from export.trt import main as trt_main

    kwargs = [f'{k}={v!r}' for k, v in model_kwargs.items()]  # timm's key=value, read back by ast.literal_eval
    status = trt_main(['--model', model, *(['--model-kwargs', *kwargs] if kwargs else []),
                       '--checkpoint', str(checkpoint), '--output', str(output), '--data-dir', str(data_dir), '--fp16'])
    onnx_files = sorted(p for p in output.glob('*.onnx') if 'fp16' not in p.name)
    return status, onnx_files[0] if onnx_files else None


def _serving_step(model: str, checkpoint: Path, data_dir: Path, output: Path) -> dict[str, Any]:
    """Step 4, continued: the OpenVINO IR (float32, with its parity report against PyTorch) and a Triton repository."""
    from export.onnx import load_export_model, load_patches
    from export.openvino import export_openvino
    from export.triton import build_repository

    net, name = load_export_model(None, str(checkpoint))
    patches, _, source = load_patches(data_dir, 'valid', 256)
    ir = export_openvino(net, output / 'openvino', model_name=name, checkpoint=str(checkpoint), precision='fp32',
                         patches=patches, patch_source=source)
    repo = build_repository(net, output / 'triton', model_name=name, checkpoint=str(checkpoint),
                            formats=('onnx', 'openvino', 'tensorrt'), parity_patches=(patches[:64], source))
    return {'openvino_ir': str(ir['xml']), 'triton_repository': str(output / 'triton'),
            'triton_models': sorted(repo['models']), 'triton_left_out': repo['skipped']}


def _publish_step(checkpoint: Path, report: Path, plots_dir: Path, onnx: Path | None, repo_id: str, output: Path
                  ) -> dict[str, Any]:
    """Step 5: the Hub folder (dry run) and the publish command that would upload it, labelled synthetic (a plain
    `hf upload` would get round publish's refusal of synthetic results)."""
    from .hub.folder import FolderConfig, build_hub_folder

    result = build_hub_folder(FolderConfig(checkpoint=checkpoint, report=report, repo_id=repo_id, output=output,
                                           onnx=onnx, plots_dir=plots_dir), log=_logger.info)
    result['upload_command'] = shlex.join([
        'python', '-m', 'timm_inception_pcam.publish', '--checkpoint', str(checkpoint), '--report', str(report),
        '--plots-dir', str(plots_dir), *(['--onnx', str(onnx)] if onnx is not None else []), '--repo-id', repo_id,
        '--output', str(output), '--allow-synthetic'])
    return result


# ----------------------------------------------------------------------------------------------- the pipeline


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the five steps into `cfg.output`; returns the summary also written to `pipeline.json`."""
    out = cfg.output
    train_cfg = train_config(cfg, out / 'data', out / 'train')  # checks the training options before any work
    create_train_model(train_cfg)  # and the model name and --model-kwargs (a throw-away model, random weights)
    started = time.monotonic()
    artefacts: dict[str, Any] = {}
    # A run that never wrote its pipeline.json (killed, failed) left only leftovers: the next run replaces them
    # without --overwrite; entries of anything else in --output are refused as a run.
    unfinished = (out / STARTED).exists() and not (out / 'pipeline.json').exists()
    finished = ('pipeline.json',) if unfinished else RUN_ENTRIES
    with claim_output_dir(out, overwrite=cfg.overwrite, finished=finished, replaces=RUN_ENTRIES):
        leftovers = [name for name in RUN_ENTRIES if (out / name).exists()]
        if leftovers and (out / STARTED).exists():
            _logger.info('replacing an unfinished run in %s (%s)', out, ', '.join(leftovers))
            for name in leftovers:
                remove_path(out / name)
        (out / STARTED).touch()
        from .data import synthesize_pcam

        _logger.info('=== 1/5 synthetic PCam sample ===')
        data_dir = out / 'data'
        files = synthesize_pcam(data_dir, n=cfg.n_train, seed=cfg.seed, n_valid=cfg.n_eval, n_test=cfg.n_eval)
        artefacts['data'] = str(data_dir)
        _logger.info('%d files in %s', len(files), data_dir)

        _logger.info('=== 2/5 training %s ===', cfg.model)
        trained: TrainResult = train(train_cfg)
        checkpoint = trained.best_checkpoint or trained.last_checkpoint
        artefacts['checkpoint'] = str(checkpoint)

        _logger.info('=== 3/5 evaluation on the test split (threshold chosen on valid) ===')
        eval_dir = out / 'evaluate'
        report = _evaluate_step(checkpoint, data_dir, eval_dir, cfg.tta, cfg.workers)
        report_path = eval_dir / 'report.json'
        artefacts['report'] = str(report_path)
        artefacts['plots'] = {k: str(eval_dir / v) for k, v in report['plots'].items()}

        onnx_path = None
        if cfg.export:
            _logger.info('=== 4/5 export: ONNX, FP16 ONNX, parity reports, TensorRT ===')
            status, onnx_path = _export_step(cfg.model, cfg.model_kwargs, checkpoint, data_dir, out / 'export')
            artefacts['export'] = str(out / 'export')
            artefacts['tensorrt'] = 'engine built' if status == 0 else f'not built here (exit {status}; see above)'
            _logger.info('--- 4/5 continued: OpenVINO IR and a Triton model repository ---')
            artefacts.update(_serving_step(cfg.model, checkpoint, data_dir, out / 'export'))

        _logger.info('=== 5/5 Hugging Face Hub folder (dry run) ===')
        hub = _publish_step(checkpoint, report_path, eval_dir, onnx_path, cfg.repo_id, out / 'hub')
        artefacts['hub_folder'] = str(hub['folder'])
        artefacts['upload_command'] = hub['upload_command']

        metrics = report['metrics']
        summary = {
            'output': str(out), 'data': 'synthetic', 'seconds': round(time.monotonic() - started, 1),
            'artefacts': artefacts, 'test': {k: metrics[k] for k in ('roc_auc', 'accuracy', 'f1', 'balanced_accuracy')},
            'best_val_roc_auc': trained.best_metric,
            'config': {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
        }
        atomic_write_json(out / 'pipeline.json', summary)
        (out / STARTED).unlink()
    return summary


def build_parser() -> argparse.ArgumentParser:
    d = PipelineConfig()
    p = ArgumentParser(prog='python -m timm_inception_pcam.pipeline', description=__doc__.split('\n\n')[0])
    p.add_argument('--output', type=Path, default=d.output, help='folder for every artefact of the run')
    p.add_argument('--overwrite', action='store_true', help='replace the run already in --output')
    p.add_argument('--model', default=d.model)
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ModelKwargsAction,
                   help='architecture arguments, e.g. depths=1,1,1 for a quick reduced-depth run')
    p.add_argument('--n-train', type=int, default=d.n_train, help='synthetic training patches')
    p.add_argument('--n-eval', type=int, default=d.n_eval, help='synthetic validation and test patches (each)')
    p.add_argument('--epochs', type=int, default=d.epochs)
    p.add_argument('-b', '--batch-size', type=int, default=d.batch_size)
    p.add_argument('--lr', type=float, default=d.lr)
    p.add_argument('--tta', type=int, default=d.tta,
                   help='test-time augmentation views in the evaluation (1 = off; 8 = all dihedral views, 8x the time)')
    p.add_argument('--seed', type=int, default=d.seed)
    p.add_argument('--workers', type=int, default=d.workers)
    p.add_argument('--repo-id', default=d.repo_id,
                   help='Hub repo the prepared folder is meant for (nothing is uploaded; the printed publish command '
                        'uploads there: put your Hub user or org in place of your-hf-user)')
    p.add_argument('--no-export', dest='export', action='store_false',
                   help='skip step 4: ONNX, FP16 ONNX, TensorRT, OpenVINO IR and Triton repository')
    p.add_argument('--progress', action=argparse.BooleanOptionalAction, default=d.progress, help='progress bars')
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command: parse `argv` into a PipelineConfig, run it, print where everything is."""
    summary = run_pipeline(PipelineConfig(**vars(build_parser().parse_args(argv))))
    artefacts = summary['artefacts']
    print('artefacts:')
    for key, value in artefacts.items():
        print(f'{key:>15}: {value}')
    if artefacts.get('upload_command'):
        cmd = artefacts['upload_command']
        print(f'\nTo upload it, labelled synthetic: {cmd if isinstance(cmd, str) else shlex.join(cmd)}')
    test = summary['test']
    print(f'\nDone in {summary["seconds"]:.0f} s: test ROC AUC {test["roc_auc"]:.3f}, accuracy {test["accuracy"]:.3f}, '
          f'F1 {test["f1"]:.3f} (synthetic data, {summary["config"]["epochs"]} epoch'
          f'{"" if summary["config"]["epochs"] == 1 else "s"}; not a PCam result)')
    return summary


if __name__ == '__main__':
    from .errors import cli

    sys.exit(cli(main, 'pipeline'))
