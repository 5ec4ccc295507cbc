"""The Hub folder: safetensors weights, timm's config.json with our provenance, the model card, plots, ONNX.

Built under a temporary name, loaded back with `timm.create_model('local-dir:...')`, then renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..constants import LABEL_NAMES, PCAM_INPUT_SIZE, PCAM_MEAN, PCAM_STD
from ..errors import OutputError
from ..storage import atomic_write_json, file_sha256, staging_dir
from .card import DEFAULT_DATASET_ID, render_card, training_description
from .report import (
    CARD_METRICS,
    ONNX_NAME,
    WEIGHTS_NAME,
    PublishError,
    check_finite,
    check_model_name,
    check_report_checkpoint,
    inspect_onnx,
    path_inside,
    plot_paths,
    provenance_of,
    read_report,
    report_provenance,
)

__all__ = ['PROVENANCE_KEY', 'PROVENANCE_FORMAT', 'FolderConfig', 'build_hub_folder']

PROVENANCE_KEY = 'timm_inception_pcam'
PROVENANCE_FORMAT = 'timm-inception-pcam-hub/1'
# Training arguments that are machine-local (paths, devices, workers) stay out of a public model card.
_PRIVATE_ARG_WORDS = ('dir', 'path', 'output', 'resume', 'checkpoint', 'device', 'workers', 'log', 'rank', 'port')


@dataclass(frozen=True)
class FolderConfig:
    """What to publish and how to describe it."""

    checkpoint: Path
    report: Path
    repo_id: str  # ORG/NAME; the folder is output/NAME
    output: Path
    model: str | None = None  # default: the checkpoint's "arch"
    use_ema: bool = False
    onnx: Path | None = None
    plots_dir: Path | None = None  # default: beside the report
    mean: Sequence[float] | None = None  # only for reports that do not record their normalisation
    std: Sequence[float] | None = None
    dataset_id: str = DEFAULT_DATASET_ID  # named in the card only for a report on PCam data
    license_id: str = 'apache-2.0'
    base_model: str | None = None

    @property
    def name(self) -> str:
        return self.repo_id.split('/')[-1]


def _content_digest(folder: Path, exclude: Iterable[str] = ('config.json',)) -> str:
    """sha256 over (relative path, file sha256) of every file in `folder` but `exclude`."""
    digest = hashlib.sha256()
    excluded = set(exclude)
    for path in sorted(p for p in folder.rglob('*') if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel not in excluded:
            digest.update(f'{rel}\0{file_sha256(path)}\n'.encode())
    return digest.hexdigest()


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished `tmp` folder onto `target`, replacing an earlier publish folder."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f'.{target.name}.', suffix='.old', dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        os.replace(old, target)  # put the earlier folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _check_target(target: Path) -> None:
    if not target.exists():
        return
    config = target / 'config.json'
    ours = False
    if target.is_dir() and not target.is_symlink() and config.is_file():
        try:
            ours = PROVENANCE_KEY in json.loads(config.read_text(encoding='utf-8'))
        except (UnicodeDecodeError, json.JSONDecodeError):
            ours = False
    if not ours:
        raise PublishError(f'{target} exists and is not a folder written by this command (no config.json with '
                           f'"{PROVENANCE_KEY}"); expected a new or earlier publish folder, choose another --output')


def _copy_onnx(info: Mapping[str, Any], folder: Path) -> None:
    source: Path = info['path']
    shutil.copyfile(source, folder / ONNX_NAME)
    for location in info['external_data']:
        src = path_inside(source.parent, location, what='external data location', source=source)  # checked again
        (folder / location).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, folder / location)


def _train_args(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The training arguments the checkpoint records (the trainer's files do), machine-local ones dropped."""
    args = meta.get('train_args')
    if not isinstance(args, dict):
        return {}
    return {k: v for k, v in args.items()
            if not any(word in k.lower() for word in _PRIVATE_ARG_WORDS) and v is not None and v != ''}


def _pool_size(model: Any, input_size: Sequence[int]) -> list[int] | None:
    import torch

    with torch.no_grad():
        feats = model.forward_features(torch.zeros(1, *input_size))
    return list(feats.shape[-2:]) if feats.ndim == 4 else None


def _data_config(model: Any) -> dict[str, Any]:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def _verify_loads_back(folder: Path, model: Any, expected: Mapping[str, Any]) -> None:
    """Load `folder` with timm's `local-dir:` source; weights and data configuration must equal the source's."""
    import timm
    import torch

    timm_log = logging.getLogger('timm.models')
    level = timm_log.level
    timm_log.setLevel(logging.WARNING)  # its INFO lines name the temporary folder; step [4/5] says what happens
    try:
        loaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    finally:
        timm_log.setLevel(level)
    source_sd, loaded_sd = model.state_dict(), loaded.state_dict()
    if source_sd.keys() != loaded_sd.keys():
        raise PublishError(f'{folder}: loads back with different parameter names '
                           f'({sorted(source_sd.keys() ^ loaded_sd.keys())[:5]})')
    for key, value in source_sd.items():
        if not torch.equal(value, loaded_sd[key]):
            raise PublishError(f'{folder}: {key} loads back with different values')
    got = _data_config(loaded)
    for key in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation'):
        if got.get(key) != expected.get(key):
            raise PublishError(f'{folder}: loads back with data config {key}={got.get(key)!r}, '
                               f'expected {expected.get(key)!r}')


def _check_measured_as_published(cfg: FolderConfig, report: Mapping[str, Any]) -> dict[str, Any]:
    """The report must describe the weights and normalisation being published; returns its normalisation."""
    if isinstance(report.get('use_ema'), bool) and report['use_ema'] != cfg.use_ema:
        fix = 'pass --use-ema' if report['use_ema'] else 'drop --use-ema'
        raise PublishError(f'{cfg.report}: use_ema is {str(report["use_ema"]).lower()}, but publishing the '
                           f'{"EMA" if cfg.use_ema else "non-EMA"} weights; {fix} to publish what was measured')
    reported_norm = report.get('normalization') if isinstance(report.get('normalization'), dict) else {}
    for key, given in (('mean', cfg.mean), ('std', cfg.std)):
        measured = reported_norm.get(key)
        if given is not None and measured is not None and [float(v) for v in given] != [float(v) for v in measured]:
            raise PublishError(f'--{key} {list(given)} differs from the {key} {measured} the report was measured '
                               f'with ({cfg.report}); the published configuration must be the evaluated one')
    return reported_norm


def _read_checkpoint(path: Path) -> dict[str, Any]:
    from ..checkpoint import CheckpointError, read_checkpoint

    try:
        return read_checkpoint(path)
    except CheckpointError as e:
        raise PublishError(str(e)) from e


ONNX_PARITY_SAMPLES, ONNX_PARITY_TOLERANCE = 32, 5e-3  # seeded random patches; max |probability difference|
# (an FP16 export stays well within it; the same architecture from another checkpoint of a run does not)


def _check_onnx_is_the_model(onnx_path: Path, model: Any, checkpoint: Path, checkpoint_sha: str) -> None:
    """PublishError unless the ONNX file is the model being published: the checkpoint it records (export.onnx's
    metadata) and its probabilities on seeded random patches against PyTorch's."""
    import numpy as np

    from ..inference import create_runner, probabilities

    runner = create_runner(onnx_path, 'onnxruntime')  # at the file's precision: an FP16 export too
    try:
        recorded = runner.spec.extra.get('checkpoint_sha256')
        if recorded and recorded != checkpoint_sha:
            raise PublishError(f'{onnx_path}: exported from another checkpoint (sha256 {recorded[:12]}..., '
                               f'{checkpoint} is {checkpoint_sha[:12]}...); export this checkpoint to publish it')
        patches = np.random.default_rng(0).integers(0, 256, (ONNX_PARITY_SAMPLES, 96, 96, 3), dtype=np.uint8)
        served = probabilities(runner, patches)
    finally:
        runner.close()
    reference = create_runner(model, 'eager')
    try:
        diff = float(np.abs(served.astype(np.float64) - probabilities(reference, patches)).max())
    finally:
        reference.close()
    if not diff <= ONNX_PARITY_TOLERANCE:
        raise PublishError(f'{onnx_path}: its probabilities differ from the published weights\' by {diff:.3g} (allowed '
                           f'{ONNX_PARITY_TOLERANCE:g}) on {ONNX_PARITY_SAMPLES} random patches: exported from '
                           f'another checkpoint, or with other --use-ema, than {checkpoint}')


def _load_checked(cfg: FolderConfig, report: Mapping[str, Any], meta: dict[str, Any]) -> tuple[Any, str]:
    """(model, architecture) of the checkpoint (`meta`: its contents) after the architecture, weights and class
    checks."""
    import timm
    from timm.models import split_model_name_tag

    from ..checkpoint import CheckpointError, load_model

    try:
        arch = check_model_name(cfg.model, '--model') if cfg.model else check_model_name(
            meta.get('arch'), f'{cfg.checkpoint} "arch"')
        reported_model = report.get('model')
        if isinstance(reported_model, str) and timm.is_model(reported_model):
            if split_model_name_tag(reported_model)[0] != split_model_name_tag(arch)[0]:
                raise PublishError(f'{cfg.report}: report is for model {reported_model!r}, but publishing {arch!r}')
        model = load_model(arch, cfg.checkpoint, use_ema=cfg.use_ema)
    except CheckpointError as e:
        raise PublishError(str(e)) from e
    check_finite(model.state_dict(), cfg.checkpoint)
    if getattr(model, 'num_classes', None) != len(LABEL_NAMES):
        raise PublishError(f'{cfg.checkpoint}: model has {getattr(model, "num_classes", None)} classes, expected '
                           f'{len(LABEL_NAMES)} ({", ".join(LABEL_NAMES)})')
    return model, arch


def build_hub_folder(cfg: FolderConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Check the inputs, write `cfg.output/<name>` atomically, verify it loads back; returns a summary."""
    import timm
    from timm.models import save_for_hf

    import timm_inception_pcam

    from ..checkpoint import model_kwargs_of

    log(f'[1/5] reading report {cfg.report}')
    report = read_report(cfg.report)  # refuses a missing report
    report_path = Path(cfg.report)
    meta = _read_checkpoint(cfg.checkpoint)  # a file that is no checkpoint is named so, not "another checkpoint"
    checkpoint_sha = file_sha256(cfg.checkpoint)
    check_report_checkpoint(report, report_path, checkpoint_sha, cfg.checkpoint)
    plot_files = plot_paths(report, report_path, cfg.plots_dir)
    onnx_info = inspect_onnx(cfg.onnx) if cfg.onnx is not None else None
    reported_norm = _check_measured_as_published(cfg, report)

    log(f'[2/5] loading {cfg.checkpoint}')
    model, arch = _load_checked(cfg, report, meta)
    if cfg.onnx is not None:
        _check_onnx_is_the_model(cfg.onnx, model, cfg.checkpoint, checkpoint_sha)
    provenance, training = report_provenance(report), provenance_of(meta.get('data_provenance'))

    # normalisation: what the evaluation used > explicit > the checkpoint's config > PCam statistics
    ckpt_cfg = meta.get('pretrained_cfg') if isinstance(meta.get('pretrained_cfg'), dict) else {}
    mean = tuple(float(v) for v in reported_norm.get('mean') or cfg.mean or ckpt_cfg.get('mean') or PCAM_MEAN)
    std = tuple(float(v) for v in reported_norm.get('std') or cfg.std or ckpt_cfg.get('std') or PCAM_STD)
    data_args = {'input_size': PCAM_INPUT_SIZE, 'mean': mean, 'std': std, 'crop_pct': 1.0, 'crop_mode': 'center',
                 'interpolation': 'bilinear'}
    model_args = {k: v for k, v in model_kwargs_of(meta).items()
                  if k not in ('drop_rate', 'drop_path_rate', 'drop_block_rate', 'pretrained')}
    target = cfg.output / cfg.name
    _check_target(target)
    try:
        cfg.output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f'{cfg.output}: cannot use as --output ({e.strerror or e}); expected a writable '
                          f'folder') from e

    log(f'[3/5] writing {target}')
    tmp = staging_dir(cfg.output, cfg.name)
    try:
        os.chmod(tmp, 0o755)
        pretrained_cfg = {
            'tag': 'synthetic' if training == 'synthetic' else 'pcam', 'license': cfg.license_id,
            'label_names': list(LABEL_NAMES), 'pool_size': _pool_size(model, PCAM_INPUT_SIZE),
            'description': training_description(arch, training),
        }
        save_for_hf(model, str(tmp), model_config={'label_names': list(LABEL_NAMES), 'pretrained_cfg': pretrained_cfg},
                    model_args=model_args, data_config=data_args, safe_serialization=True)
        if (tmp / 'pytorch_model.bin').exists():
            raise PublishError(f'{tmp}: timm wrote a pickle (pytorch_model.bin); expected {WEIGHTS_NAME} only')
        plots = {}
        for key, src in plot_files.items():
            dest = f'{key}{src.suffix.lower() or ".png"}'
            shutil.copyfile(src, tmp / dest)
            plots[key] = dest
        if onnx_info is not None:
            _copy_onnx(onnx_info, tmp)

        config = json.loads((tmp / 'config.json').read_text(encoding='utf-8'))
        expected_data = _data_config(model) | {k: list(v) if isinstance(v, tuple) else v for k, v in data_args.items()
                                               if k in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation')}
        hashes = {
            'format': PROVENANCE_FORMAT,
            'checkpoint_sha256': checkpoint_sha,
            'report_sha256': file_sha256(report_path),
            'weights_sha256': file_sha256(tmp / WEIGHTS_NAME),
            'data_provenance': provenance,
            'training_data_provenance': training,
            'timm_version': timm.__version__,
            'package_version': timm_inception_pcam.__version__,
        }
        card = render_card(
            repo_id=cfg.repo_id, arch=arch, report=report, provenance=provenance, training=training, meta=meta,
            train_args=_train_args(meta), model_args=config.get('model_args', {}),
            data_cfg=expected_data, plots=plots, onnx_info=onnx_info,
            num_params=sum(p.numel() for p in model.parameters()), hashes=hashes, dataset_id=cfg.dataset_id,
            license_id=cfg.license_id, base_model=cfg.base_model)
        (tmp / 'README.md').write_text(card, encoding='utf-8')
        hashes['content_sha256'] = _content_digest(tmp)
        config[PROVENANCE_KEY] = hashes
        atomic_write_json(tmp / 'config.json', config)

        log('[4/5] loading the folder back with timm (local-dir:)')
        _verify_loads_back(tmp, model, expected_data)
        for path in tmp.rglob('*'):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        _replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(p.relative_to(target).as_posix() for p in target.rglob('*') if p.is_file())
    return {'folder': str(target), 'files': files, 'model': arch, 'checkpoint_sha256': checkpoint_sha,
            'config': config, 'split': report['split'], 'data_provenance': provenance,
            'training_data_provenance': training, 'metrics': {k: report['metrics'][k] for k, _, _ in CARD_METRICS}}
