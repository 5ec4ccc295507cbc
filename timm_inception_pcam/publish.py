"""Publish a trained checkpoint to the Hugging Face Hub as a timm model repository, and check it loads back.

    python -m timm_inception_pcam.publish --checkpoint model_best.pth --report report.json \\
        --repo-id ORG/NAME [--model NAME] [--onnx model.onnx] [--plots-dir DIR] [--dry-run] --output DIR

Writes DIR/NAME atomically: `model.safetensors` (no pickle), `config.json` in timm's format (architecture, num_classes,
model_args, pretrained_cfg with the 96-px PCam data configuration, label names, plus the provenance of the files),
a model card `README.md` whose front matter carries the evaluation report's metrics, the report's ROC / PR plots
and, optionally, the ONNX model. Before writing, the folder is loaded back with `timm.create_model('local-dir:...')`
and must give the same weights and data configuration. Without `--dry-run` it is uploaded with huggingface_hub,
unless the Hub already holds the identical `config.json` (same checkpoint, report and files): no duplicate commit.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .constants import LABEL_NAMES, PCAM_INPUT_SIZE, PCAM_MEAN, PCAM_STD, SPLITS
from .errors import UsageError
from .models._common import PCAM_HUB_ORG
from .storage import atomic_write_json, file_sha256

__all__ = [
    'PublishError', 'OFFICIAL_HUB_ORG', 'OFFICIAL_REPOS', 'unpublished_weights_message', 'read_report',
    'check_report_checkpoint', 'check_finite', 'build_hub_folder', 'upload_folder', 'upload_command', 'main',
]

REPORT_FORMAT = 'timm-inception-pcam-report/1'
PROVENANCE_KEY = 'timm_inception_pcam'
PROVENANCE_FORMAT = 'timm-inception-pcam-hub/1'
DEFAULT_DATASET_ID = '1aurent/PatchCamelyon'
WEIGHTS_NAME = 'model.safetensors'
ONNX_NAME = 'model.onnx'
# (report key, model-index metric type, display name): the metrics the model card's front matter carries.
CARD_METRICS = (
    ('accuracy', 'accuracy', 'Accuracy'),
    ('roc_auc', 'roc_auc', 'ROC AUC'),
    ('f1', 'f1', 'F1'),
    ('balanced_accuracy', 'balanced_accuracy', 'Balanced accuracy'),
)
TABLE_METRICS = (
    ('accuracy', 'Accuracy'), ('roc_auc', 'ROC AUC'), ('f1', 'F1'), ('balanced_accuracy', 'Balanced accuracy'),
    ('precision', 'Precision'), ('recall', 'Recall (sensitivity)'), ('average_precision', 'Average precision'),
    ('nll', 'NLL'), ('ece', 'ECE'),
)
REQUIRED_PLOTS = ('roc', 'pr')
OPTIONAL_PLOTS = ('confusion',)
# Remote weight files an upload removes unless the new folder has them: no stale pickle or ONNX beside new weights.
STALE_WEIGHT_PATTERNS = ('*.onnx', '*.onnx.data', '*.data', '*.bin', '*.pth', '*.pt', '*.ckpt', '*.safetensors')
# Training arguments that are machine-local (paths, devices, workers) stay out of a public model card.
_PRIVATE_ARG_WORDS = ('dir', 'path', 'output', 'resume', 'checkpoint', 'device', 'workers', 'log', 'rank', 'port')
_PAPERS = {
    'inception_v4_pcam': 'Inception-v4',
    'inception_resnet_v2_pcam': 'Inception-ResNet-v2',
}

# Where the project's own PCam-trained weights go: the models' `<model>.pcam` tags name these repos.
OFFICIAL_HUB_ORG = PCAM_HUB_ORG
OFFICIAL_REPOS: dict[str, str] = {name: f'{OFFICIAL_HUB_ORG}/{name}' for name in _PAPERS}


class PublishError(UsageError):
    """Input that must not be published (missing / mismatched report, bad weights, unknown model, ...)."""


def unpublished_weights_message(variant: str) -> str:
    """Why `timm.create_model('<variant>.pcam', pretrained=True)` cannot load yet, and what to use instead."""
    repo = OFFICIAL_REPOS.get(variant, f'{OFFICIAL_HUB_ORG}/{variant}')
    return (f'{variant}.pcam: the PCam-trained weights are not published yet; they will be at '
            f'https://huggingface.co/{repo} (load them then with pretrained=True or "hf-hub:{repo}"). '
            f'Until then use `{variant}.tf_in1k` (timm\'s ImageNet weights, new 2-class head) and fine-tune on PCam, '
            f'or train your own (python -m timm_inception_pcam.train --model {variant}) and load the checkpoint '
            f'with timm_inception_pcam.checkpoint.load_model or publish it with python -m timm_inception_pcam.publish.')


# ----------------------------------------------------------------------------------------------------- checks


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_report(path: str | os.PathLike | None) -> dict[str, Any]:
    """Load and validate an evaluation report (`python -m timm_inception_pcam.evaluate`)."""
    if path is None:
        raise PublishError('no evaluation report: pass --report report.json, written by '
                           '`python -m timm_inception_pcam.evaluate` for this checkpoint; weights are not published '
                           'without measured metrics')
    path = Path(path)
    if not path.is_file():
        raise PublishError(f'{path}: evaluation report not found (expected the report.json written by '
                           f'`python -m timm_inception_pcam.evaluate`)')
    try:
        report = json.loads(path.read_text(encoding='utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PublishError(f'{path}: not a JSON evaluation report ({e})') from e
    if not isinstance(report, dict) or report.get('format') != REPORT_FORMAT:
        found = report.get('format') if isinstance(report, dict) else type(report).__name__
        raise PublishError(f'{path}: format is {found!r}, expected {REPORT_FORMAT!r}')
    if report.get('split') not in SPLITS:
        raise PublishError(f'{path}: split is {report.get("split")!r}, expected one of {", ".join(SPLITS)}')
    if not isinstance(report.get('n'), int) or report['n'] < 1:
        raise PublishError(f'{path}: n is {report.get("n")!r}, expected a positive number of patches')
    metrics = report.get('metrics')
    if not isinstance(metrics, dict):
        raise PublishError(f'{path}: no "metrics" object')
    for key, _, _ in CARD_METRICS:
        if not _finite_number(metrics.get(key)):
            raise PublishError(f'{path}: metrics.{key} is {metrics.get(key)!r}, expected a finite number')
    return report


def check_report_checkpoint(report: Mapping[str, Any], report_path: str | os.PathLike, checkpoint_sha256: str,
                            checkpoint_path: str | os.PathLike) -> None:
    """Refuse a report that was measured on another checkpoint (or cannot say which)."""
    reported = report.get('checkpoint_sha256')
    if not reported:
        raise PublishError(f'{report_path}: checkpoint_sha256 is {reported!r}, so the report cannot be matched to '
                           f'{checkpoint_path} (sha256 {checkpoint_sha256}); evaluate the checkpoint file itself')
    if str(reported).lower() != checkpoint_sha256:
        raise PublishError(f'{report_path} was measured on another checkpoint: its checkpoint_sha256 is {reported} '
                           f'({report.get("checkpoint")}), but {checkpoint_path} has sha256 {checkpoint_sha256}; '
                           f'evaluate this checkpoint and publish with that report')


def check_finite(state_dict: Mapping[str, Any], source: str | os.PathLike) -> None:
    """Refuse weights holding NaN or Inf, naming the first offending tensors."""
    import torch

    bad = []
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            if bool(torch.isfinite(tensor.sum())):  # any NaN/Inf makes the sum non-finite: a cheap first pass
                continue
            n_bad = int((~torch.isfinite(tensor)).sum())
            if n_bad:
                bad.append(f'{name} ({n_bad} of {tensor.numel()})')
    if bad:
        shown = ', '.join(bad[:5]) + (f' and {len(bad) - 5} more' if len(bad) > 5 else '')
        raise PublishError(f'{source}: weights hold NaN/Inf values in {len(bad)} tensors: {shown}; expected all finite')


def _check_model_name(name: str | None, source: str) -> str:
    import timm

    if not name:
        raise PublishError(f'{source}: the checkpoint records no architecture ("arch"); pass --model')
    if not timm.is_model(name):
        raise PublishError(f'unknown model {name!r} (from {source}): not registered in timm; expected one of this '
                           f'project\'s models ({", ".join(_PAPERS)}) or another registered timm model')
    return name


# ---------------------------------------------------------------------------------------------------- folder


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
    if target.is_dir() and config.is_file():
        try:
            ours = PROVENANCE_KEY in json.loads(config.read_text(encoding='utf-8'))
        except (UnicodeDecodeError, json.JSONDecodeError):
            ours = False
    if not ours:
        raise PublishError(f'{target} exists and is not a folder written by this command (no config.json with '
                           f'"{PROVENANCE_KEY}"); expected a new or earlier publish folder, choose another --output')


def _inspect_onnx(onnx_path: Path) -> dict[str, Any]:
    """Check an ONNX model and the external-data files it names; return its inputs, outputs and those files."""
    import onnx

    if not onnx_path.is_file():
        raise PublishError(f'{onnx_path}: ONNX model not found')
    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others for a bad file
        raise PublishError(f'{onnx_path}: not a readable ONNX model ({e})') from e
    locations = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == 'location':
                locations.add(entry.value)
    for location in sorted(locations):
        rel = Path(location)
        if rel.is_absolute() or '..' in rel.parts or rel.as_posix() in ('config.json', 'README.md', WEIGHTS_NAME,
                                                                         ONNX_NAME):
            raise PublishError(f'{onnx_path}: external data location {location!r}, expected a plain file name '
                               f'beside the model')
        if not (onnx_path.parent / rel).is_file():
            raise PublishError(f'{onnx_path}: external data file {onnx_path.parent / rel} not found')

    if not proto.graph.input or not proto.graph.output:
        raise PublishError(f'{onnx_path}: graph has {len(proto.graph.input)} inputs and {len(proto.graph.output)} '
                           f'outputs, expected an image input and a logits output')

    def _shape(value: Any) -> list[int | str]:
        dims = value.type.tensor_type.shape.dim
        return [d.dim_value if d.HasField('dim_value') else (d.dim_param or '?') for d in dims]

    elem_type = proto.graph.input[0].type.tensor_type.elem_type
    return {
        'path': onnx_path,
        'input_dtype': onnx.helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type else 'float32',
        'inputs': [(v.name, _shape(v)) for v in proto.graph.input],
        'outputs': [(v.name, _shape(v)) for v in proto.graph.output],
        'external_data': sorted(locations),
    }


def _copy_onnx(info: Mapping[str, Any], folder: Path) -> None:
    source: Path = info['path']
    shutil.copyfile(source, folder / ONNX_NAME)
    for location in info['external_data']:
        (folder / location).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.parent / location, folder / location)


def _plot_paths(report: Mapping[str, Any], report_path: Path, plots_dir: Path | None) -> dict[str, Path]:
    plots = report.get('plots') or {}
    base = plots_dir if plots_dir is not None else report_path.parent
    found: dict[str, Path] = {}
    for key in REQUIRED_PLOTS + OPTIONAL_PLOTS:
        name = plots.get(key)
        if not name:
            if key in REQUIRED_PLOTS:
                raise PublishError(f'{report_path}: plots.{key} is missing; the model card needs the ROC and PR plots '
                                   f'(re-run the evaluation with plots)')
            continue
        path = base / Path(name).name if plots_dir is not None else base / name
        if not path.is_file():
            if key in REQUIRED_PLOTS:
                raise PublishError(f'{path}: {key} plot named by {report_path} not found (pass --plots-dir DIR if the '
                                   f'plots live elsewhere)')
            continue
        found[key] = path
    return found


def _train_args(meta: Mapping[str, Any], checkpoint: Path) -> dict[str, Any]:
    """Training arguments from the checkpoint, else from the run's last.pth beside it; machine-local ones dropped."""
    args = meta.get('train_args')
    if not isinstance(args, dict):
        sibling = checkpoint.parent / 'last.pth'
        if sibling.is_file() and sibling.resolve() != checkpoint.resolve():
            from .checkpoint import read_checkpoint
            try:
                args = read_checkpoint(sibling).get('train_args')
            except Exception:  # an unreadable sibling only costs the recipe section
                args = None
    if not isinstance(args, dict):
        return {}
    return {k: v for k, v in args.items()
            if not any(word in k.lower() for word in _PRIVATE_ARG_WORDS) and v is not None and v != ''}


def _fmt(value: float) -> str:
    return f'{value:.4f}'


def _yaml_front_matter(*, name: str, report: Mapping[str, Any], dataset_id: str, license_id: str,
                       base_model: str | None) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    split = report['split']
    results = [
        EvalResult(task_type='image-classification', task_name='Image Classification', dataset_type=dataset_id,
                   dataset_name='PatchCamelyon (PCam)', dataset_split=split, metric_type=metric_type,
                   metric_value=round(float(report['metrics'][key]), 6), metric_name=f'{display} ({split})')
        for key, metric_type, display in CARD_METRICS
    ]
    data = ModelCardData(
        library_name='timm', pipeline_tag='image-classification', license=license_id, datasets=[dataset_id],
        tags=['timm', 'image-classification', 'pathology', 'histopathology', 'patchcamelyon', 'pcam',
              'timm-inception-pcam'],
        base_model=base_model, metrics=[m[1] for m in CARD_METRICS], model_name=name, eval_results=results,
    )
    return f'---\n{data.to_yaml()}\n---\n'


def _model_card(*, repo_id: str, arch: str, report: Mapping[str, Any], meta: Mapping[str, Any],
                train_args: Mapping[str, Any], model_args: Mapping[str, Any], data_cfg: Mapping[str, Any],
                plots: Mapping[str, str], onnx_info: Mapping[str, Any] | None, num_params: int,
                provenance: Mapping[str, Any], dataset_id: str, license_id: str, base_model: str | None) -> str:
    name = repo_id.split('/')[-1]
    split = report['split']
    metrics = report['metrics']
    ci95 = report.get('ci95') or {}
    mean = ', '.join(f'{v:.4f}' for v in data_cfg['mean'])
    std = ', '.join(f'{v:.4f}' for v in data_cfg['std'])
    size = data_cfg['input_size']
    paper = _PAPERS.get(arch, arch)
    lines = [_yaml_front_matter(name=name, report=report, dataset_id=dataset_id, license_id=license_id,
                                base_model=base_model)]
    lines += [
        f'# {name}', '',
        f'{paper} (`{arch}`, {num_params / 1e6:.1f} M parameters) trained on PatchCamelyon (PCam) to classify '
        f'{size[1]}x{size[2]} RGB patches of H&E-stained lymph-node sections as **{LABEL_NAMES[0]}** (class 0) '
        f'or **{LABEL_NAMES[1]}** (class 1, tumour in the centre 32x32 region). A timm model from the '
        f'[timm-inception-pcam](https://github.com/timm-inception-pcam/timm-inception-pcam) plugin.', '',
        f'## Results on the PCam {split} split', '',
        f'Measured on {report["n"]} patches of the `{split}` split'
        + (f' with {report["tta"]}-fold dihedral test-time augmentation' if report.get('tta', 1) > 1 else '')
        + '.', '',
        '| metric | value | 95% CI |', '| --- | --- | --- |',
    ]
    for key, display in TABLE_METRICS:
        if _finite_number(metrics.get(key)):
            ci = ci95.get(key)
            ci_text = f'{_fmt(ci[0])} to {_fmt(ci[1])}' if isinstance(ci, (list, tuple)) and len(ci) == 2 else ''
            lines.append(f'| {display} | {_fmt(metrics[key])} | {ci_text} |')
    threshold = report.get('threshold') or {}
    if _finite_number(threshold.get('value')):
        source = 'chosen on the valid split' if threshold.get('source') == 'valid' else 'the default'
        lines += ['', f'Decisions use P({LABEL_NAMES[1]}) >= {threshold["value"]:.4f} ({source}).']
    if all(_finite_number(metrics.get(k)) for k in ('tp', 'fp', 'tn', 'fn')):
        lines += [f'Confusion counts: TP {metrics["tp"]}, FP {metrics["fp"]}, TN {metrics["tn"]}, FN {metrics["fn"]}.']
    if plots:
        lines += ['', ' '.join(f'![{key} curve]({file})' for key, file in plots.items())]
    lines += [
        '', '## Usage', '',
        '### timm', '',
        'The architecture is registered by the `timm_inception_pcam` package: install it, import it, then load the '
        'weights by repo id.', '',
        '```python', 'import timm', 'import torch', 'from PIL import Image', '',
        f'import timm_inception_pcam  # registers {arch}', '',
        f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()',
        'config = timm.data.resolve_data_config({}, model=model)  # 96 px, PCam mean/std, crop_pct 1.0 (no crop)',
        'transform = timm.data.create_transform(**config)',
        'x = transform(Image.open("patch.png").convert("RGB")).unsqueeze(0)  # a 96x96 patch at about 1 um/px',
        'with torch.no_grad():',
        f'    p_{LABEL_NAMES[1]} = model(x).softmax(-1)[:, 1]',
        '```', '',
        '### ONNX', '',
    ]
    baked = bool(onnx_info) and onnx_info['input_dtype'] == 'uint8'  # preprocessing inside the graph
    if onnx_info:
        input_name, input_shape = onnx_info['inputs'][0]
        output_name = onnx_info['outputs'][0][0]
        extra = (' with its external weights file ' + ', '.join(f'`{p}`' for p in onnx_info['external_data'])
                 if onnx_info['external_data'] else '')
        layout = ('uint8 NHWC patches, normalisation inside the graph' if baked else
                  f'{onnx_info["input_dtype"]} NCHW, normalised as above')
        lines += [f'`{ONNX_NAME}`{extra} is the exported graph: input `{input_name}` {input_shape}, {layout}; '
                  f'output `{output_name}`, the logits.', '']
    else:
        input_name, output_name = 'input', 'logits'
        lines += ['No ONNX file is published here: export one from the timm model (this project\'s export step '
                  'names the input `input` and the output `logits`, with a dynamic batch dimension).', '']
    feed = (['x = np.ascontiguousarray(patches)'] if baked else [
        f'mean = np.array([{mean}], np.float32)', f'std = np.array([{std}], np.float32)',
        'x = np.ascontiguousarray(((patches / 255 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2))'])
    trt_shape = '96x96x3' if baked else '3x96x96'
    lines += [
        '```python', 'import numpy as np', 'import onnxruntime as ort', '',
        f'session = ort.InferenceSession("{ONNX_NAME}", providers=["CPUExecutionProvider"])',
        'patches = ...  # uint8 array (N, 96, 96, 3), RGB',
        *feed,
        f'logits = session.run(["{output_name}"], {{"{input_name}": x}})[0]',
        'e = np.exp(logits - logits.max(1, keepdims=True))',
        f'p_{LABEL_NAMES[1]} = (e / e.sum(1, keepdims=True))[:, 1]',
        '```', '',
        '### TensorRT', '',
        'Build an engine on the GPU that will run it (a plan is tied to the TensorRT version and the GPU). '
        'TensorRT 11 networks are strongly typed and `trtexec --fp16` no longer exists: for FP16, convert the ONNX '
        'graph to mixed FP16 first (for example onnxconverter-common\'s `float16.convert_float_to_float16(model, '
        'keep_io_types=True)`), then build:', '',
        '```bash',
        f'trtexec --onnx={ONNX_NAME} --saveEngine=model.plan \\',
        f'    --minShapes={input_name}:1x{trt_shape} --optShapes={input_name}:64x{trt_shape} '
        f'--maxShapes={input_name}:256x{trt_shape}',
        '```', '',
        '## Preprocessing', '',
        f'- Input: RGB patches of {size[1]}x{size[2]} px at PCam\'s resolution (Camelyon16 level 2, about 0.97 '
        'um/px, "10x"); no resize and no crop (`crop_pct` 1.0).',
        f'- Normalisation: `(x / 255 - mean) / std` with mean ({mean}) and std ({std}).',
        f'- Output: 2 logits, softmax gives P({LABEL_NAMES[0]}), P({LABEL_NAMES[1]}).', '',
        '## Training', '',
        f'- Architecture arguments: `{json.dumps(dict(model_args), sort_keys=True)}`.',
    ]
    for key, label in (('epoch', 'Checkpoint epoch'), ('weights', 'Weights'), ('selection', 'Selected by'),
                       ('best_metric', 'Selection value')):
        if meta.get(key) is not None:
            lines.append(f'- {label}: {meta[key]}')
    if base_model:
        lines.append(f'- Initialised from `{base_model}`.')
    if train_args:
        lines += ['', '| argument | value |', '| --- | --- |']
        lines += [f'| {k} | `{json.dumps(v)}` |' for k, v in sorted(train_args.items())]
    else:
        lines.append('- The training arguments were not recorded with the checkpoint.')
    lines += [
        '', '## Limitations', '',
        '- **Not a medical device.** Research use only: not validated for diagnosis, treatment or any clinical '
        'decision, and not cleared by any regulator.',
        '- Trained and evaluated on PCam only: H&E lymph-node sections of the Camelyon16 challenge, from two Dutch '
        'centres, at one resolution. Other stains, scanners, tissues, magnifications or centres shift the inputs; '
        'expect lower and uncalibrated performance there.',
        '- The label refers to the centre 32x32 px of a patch: tumour elsewhere in the patch is labelled normal.',
        '- PCam contains duplicate patches and was built with hard-negative mining: patch-level figures do not '
        'translate into slide-level or patient-level performance.',
        '', '## Provenance', '',
        f'- Checkpoint sha256: `{provenance["checkpoint_sha256"]}`',
        f'- Evaluation report sha256: `{provenance["report_sha256"]}`',
        f'- Weights (`{WEIGHTS_NAME}`) sha256: `{provenance["weights_sha256"]}`',
        f'- timm {provenance["timm_version"]}, timm-inception-pcam {provenance["package_version"]}',
        '', '## Citation', '',
        '```bibtex',
        '@inproceedings{szegedy2017inception,',
        '  title={Inception-v4, Inception-ResNet and the Impact of Residual Connections on Learning},',
        '  author={Szegedy, Christian and Ioffe, Sergey and Vanhoucke, Vincent and Alemi, Alexander A.},',
        '  booktitle={AAAI Conference on Artificial Intelligence}, year={2017}',
        '}',
        '@inproceedings{veeling2018rotation,',
        '  title={Rotation Equivariant {CNN}s for Digital Pathology},',
        '  author={Veeling, Bastiaan S. and Linmans, Jasper and Winkens, Jim and Cohen, Taco and Welling, Max},',
        '  booktitle={Medical Image Computing and Computer Assisted Intervention (MICCAI)}, year={2018}',
        '}',
        '```', '',
    ]
    return '\n'.join(lines)


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

    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
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


def build_hub_folder(
        *,
        checkpoint: Path,
        report_path: Path,
        repo_id: str,
        output: Path,
        model_name: str | None = None,
        use_ema: bool = False,
        onnx: Path | None = None,
        plots_dir: Path | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        dataset_id: str = DEFAULT_DATASET_ID,
        license_id: str = 'apache-2.0',
        base_model: str | None = None,
        log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Check the inputs, write `output/<name>` atomically, verify it loads back; returns a summary."""
    import timm
    from timm.models import save_for_hf, split_model_name_tag

    import timm_inception_pcam

    from .checkpoint import CheckpointError, load_model, model_kwargs_of, read_checkpoint

    log(f'[1/5] reading report {report_path}')
    report = read_report(report_path)
    if not checkpoint.is_file():
        raise PublishError(f'{checkpoint}: checkpoint file not found')
    checkpoint_sha = file_sha256(checkpoint)
    check_report_checkpoint(report, report_path, checkpoint_sha, checkpoint)
    plot_files = _plot_paths(report, report_path, plots_dir)
    onnx_info = _inspect_onnx(onnx) if onnx is not None else None

    if isinstance(report.get('use_ema'), bool) and report['use_ema'] != use_ema:
        fix = 'pass --use-ema' if report['use_ema'] else 'drop --use-ema'
        raise PublishError(f'{report_path}: use_ema is {str(report["use_ema"]).lower()}, but publishing the '
                           f'{"EMA" if use_ema else "non-EMA"} weights; {fix} to publish what was measured')

    reported_norm = report.get('normalization') if isinstance(report.get('normalization'), dict) else {}
    for key, given in (('mean', mean), ('std', std)):
        measured = reported_norm.get(key)
        if given is not None and measured is not None and [float(v) for v in given] != [float(v) for v in measured]:
            raise PublishError(f'--{key} {list(given)} differs from the {key} {measured} the report was measured '
                               f'with ({report_path}); the published configuration must be the evaluated one')

    log(f'[2/5] loading {checkpoint}')
    try:
        meta = read_checkpoint(checkpoint)
        arch = _check_model_name(model_name, '--model') if model_name else _check_model_name(
            meta.get('arch'), f'{checkpoint} "arch"')
        reported_model = report.get('model')
        if isinstance(reported_model, str) and timm.is_model(reported_model):
            if split_model_name_tag(reported_model)[0] != split_model_name_tag(arch)[0]:
                raise PublishError(f'{report_path}: report is for model {reported_model!r}, but publishing {arch!r}')
        model = load_model(arch, checkpoint, use_ema=use_ema)
    except CheckpointError as e:
        raise PublishError(str(e)) from e
    check_finite(model.state_dict(), checkpoint)
    if getattr(model, 'num_classes', None) != len(LABEL_NAMES):
        raise PublishError(f'{checkpoint}: model has {getattr(model, "num_classes", None)} classes, expected '
                           f'{len(LABEL_NAMES)} ({", ".join(LABEL_NAMES)})')

    # normalisation: what the evaluation used > explicit > the checkpoint's config > PCam statistics
    ckpt_cfg = meta.get('pretrained_cfg') if isinstance(meta.get('pretrained_cfg'), dict) else {}
    mean = tuple(float(v) for v in reported_norm.get('mean') or mean or ckpt_cfg.get('mean') or PCAM_MEAN)
    std = tuple(float(v) for v in reported_norm.get('std') or std or ckpt_cfg.get('std') or PCAM_STD)
    data_args = {'input_size': PCAM_INPUT_SIZE, 'mean': mean, 'std': std, 'crop_pct': 1.0, 'crop_mode': 'center',
                 'interpolation': 'bilinear'}
    model_args = {k: v for k, v in model_kwargs_of(meta).items()
                  if k not in ('drop_rate', 'drop_path_rate', 'drop_block_rate', 'pretrained')}
    name = repo_id.split('/')[-1]
    target = output / name
    _check_target(target)
    output.mkdir(parents=True, exist_ok=True)

    log(f'[3/5] writing {target}')
    tmp = Path(tempfile.mkdtemp(prefix=f'.{name}.', suffix='.partial', dir=output))
    try:
        os.chmod(tmp, 0o755)
        pretrained_cfg = {
            'tag': 'pcam', 'license': license_id, 'label_names': list(LABEL_NAMES),
            'pool_size': _pool_size(model, PCAM_INPUT_SIZE),
            'description': f'{_PAPERS.get(arch, arch)} trained on PatchCamelyon (normal / metastatic)',
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
        provenance = {
            'format': PROVENANCE_FORMAT,
            'checkpoint_sha256': checkpoint_sha,
            'report_sha256': file_sha256(report_path),
            'weights_sha256': file_sha256(tmp / WEIGHTS_NAME),
            'timm_version': timm.__version__,
            'package_version': timm_inception_pcam.__version__,
        }
        card = _model_card(
            repo_id=repo_id, arch=arch, report=report, meta=meta, train_args=_train_args(meta, checkpoint),
            model_args=config.get('model_args', {}), data_cfg=expected_data, plots=plots, onnx_info=onnx_info,
            num_params=sum(p.numel() for p in model.parameters()), provenance=provenance, dataset_id=dataset_id,
            license_id=license_id, base_model=base_model)
        (tmp / 'README.md').write_text(card, encoding='utf-8')
        provenance['content_sha256'] = _content_digest(tmp)
        config[PROVENANCE_KEY] = provenance
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
            'config': config, 'split': report['split'],
            'metrics': {k: report['metrics'][k] for k, _, _ in CARD_METRICS}}


# ---------------------------------------------------------------------------------------------------- upload


def upload_command(folder: str | os.PathLike, repo_id: str, commit_message: str, private: bool = False) -> str:
    """The `hf upload` command line equivalent to the upload this tool performs."""
    cmd = ['hf', 'upload', repo_id, str(folder), '.', '--repo-type', 'model', '--commit-message', commit_message]
    if private:
        cmd.append('--private')
    return shlex.join(cmd)


def _remote_config(api: Any, repo_id: str, revision: str | None) -> dict[str, Any] | None:
    if not api.file_exists(repo_id, 'config.json', revision=revision):
        return None
    path = api.hf_hub_download(repo_id=repo_id, filename='config.json', revision=revision)
    try:
        return json.loads(Path(path).read_text(encoding='utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def upload_folder(folder: str | os.PathLike, repo_id: str, *, commit_message: str, private: bool = False,
                  revision: str | None = None, api: Any = None) -> dict[str, Any]:
    """Create the repo if needed and upload `folder`, unless the Hub already holds the identical config.json.

    Remote weight files that the folder does not have (an earlier ONNX model, a pickle) are deleted in the same commit.

    The token comes from HF_TOKEN or the cached login (`hf auth login`); it is never printed or written.
    """
    folder = Path(folder)
    local = json.loads((folder / 'config.json').read_text(encoding='utf-8'))
    if api is None:
        from huggingface_hub import HfApi, get_token

        if not get_token():
            command = upload_command(folder, repo_id, commit_message, private)
            raise PublishError(f'no Hugging Face token: set HF_TOKEN or run `hf auth login`; the folder {folder} is '
                               f'ready, upload it later with: {command}')
        api = HfApi(library_name='timm-inception-pcam')
    try:
        repo_url = api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
        repo_id = getattr(repo_url, 'repo_id', None) or repo_id
        remote = _remote_config(api, repo_id, revision)
        url = f'https://huggingface.co/{repo_id}'
        if remote == local:
            return {'uploaded': False, 'url': url, 'commit_url': None,
                    'reason': 'the Hub already holds this exact folder (same checkpoint, report and files)'}
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type='model', revision=revision,
                                 commit_message=commit_message, delete_patterns=list(STALE_WEIGHT_PATTERNS))
    except Exception as e:  # network / permission / offline errors of huggingface_hub, reported without a traceback
        detail = (str(e).splitlines() or [''])[0][:300]
        command = upload_command(folder, repo_id, commit_message, private)
        raise PublishError(f'upload to {repo_id} failed ({type(e).__name__}: {detail}); the folder {folder} is '
                           f'ready, retry or run: {command}') from e
    return {'uploaded': True, 'url': url, 'commit_url': getattr(info, 'commit_url', None),
            'reason': 'updated' if remote and remote.get(PROVENANCE_KEY, {}).get('checkpoint_sha256') ==
            local[PROVENANCE_KEY]['checkpoint_sha256'] else 'new checkpoint'}


# ------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m timm_inception_pcam.publish', description=__doc__.split('\n\n')[0])
    p.add_argument('--checkpoint', required=True, type=Path, help='trained checkpoint file to publish')
    p.add_argument('--report', type=Path, default=None,
                   help='report.json from `python -m timm_inception_pcam.evaluate` for this checkpoint (required)')
    p.add_argument('--repo-id', required=True, help='Hub repository, ORG/NAME')
    p.add_argument('--model', default=None, help='model name (default: the checkpoint\'s "arch")')
    p.add_argument('--use-ema', action='store_true', help='publish the checkpoint\'s EMA weights')
    p.add_argument('--onnx', type=Path, default=None, help='also publish this exported ONNX model (as model.onnx)')
    p.add_argument('--plots-dir', type=Path, default=None, help='where the report\'s plots are (default: beside it)')
    p.add_argument('--mean', type=float, nargs=3, default=None, metavar=('R', 'G', 'B'),
                   help='normalisation mean for reports that do not record theirs (default: the report\'s, else '
                        'the checkpoint\'s, else PCam\'s)')
    p.add_argument('--std', type=float, nargs=3, default=None, metavar=('R', 'G', 'B'), help='as --mean')
    p.add_argument('--dataset-id', default=DEFAULT_DATASET_ID,
                   help=f'Hub dataset id named in the model card (default: {DEFAULT_DATASET_ID})')
    p.add_argument('--license', default='apache-2.0', help='license of the published weights (default: apache-2.0)')
    p.add_argument('--base-model', default=None, help='Hub id of the initial weights, e.g. timm/inception_v4.tf_in1k')
    p.add_argument('--private', action='store_true', help='create the repository private')
    p.add_argument('--revision', default=None, help='branch to upload to (default: main)')
    p.add_argument('--commit-message', default=None, help='default: names the model, checkpoint and ROC AUC')
    p.add_argument('--dry-run', action='store_true', help='write and verify the folder, upload nothing')
    p.add_argument('--output', required=True, type=Path, help='folder under which ORG/NAME\'s NAME folder is written')
    return p


def main(argv: list[str] | None = None, *, api: Any = None) -> dict[str, Any]:
    """Build the Hub folder; upload it unless --dry-run. `api` replaces huggingface_hub.HfApi (tests)."""
    args = build_parser().parse_args(argv)
    if args.repo_id.count('/') != 1 or not all(args.repo_id.split('/')):
        raise PublishError(f'--repo-id {args.repo_id!r}: expected ORG/NAME')
    result = build_hub_folder(
        checkpoint=args.checkpoint, report_path=args.report, repo_id=args.repo_id, output=args.output,
        model_name=args.model, use_ema=args.use_ema, onnx=args.onnx, plots_dir=args.plots_dir, mean=args.mean,
        std=args.std, dataset_id=args.dataset_id, license_id=args.license, base_model=args.base_model)
    message = args.commit_message or (
        f'Publish {result["model"]} (checkpoint sha256 {result["checkpoint_sha256"][:12]}, '
        f'{result["split"]} ROC AUC {result["metrics"]["roc_auc"]:.4f})')
    result['repo_id'] = args.repo_id
    result['upload_command'] = upload_command(result['folder'], args.repo_id, message, args.private)
    result['uploaded'] = False
    if args.repo_id == OFFICIAL_REPOS.get(result['model']):
        print(f'note: {args.repo_id} is the official repo of the {result["model"]}.pcam tag; once uploaded, set '
              f'PCAM_WEIGHTS_PUBLISHED[{result["model"]!r}] in timm_inception_pcam/models/_common.py so that '
              f'pretrained=True loads it')
    if args.dry_run:
        print('[5/5] dry run: nothing uploaded')
        print(f'upload with: {result["upload_command"]}')
        summary = f'dry run: {result["folder"]} ready ({len(result["files"])} files) for {args.repo_id}'
    else:
        print(f'[5/5] uploading to {args.repo_id}')
        result.update(upload_folder(result['folder'], args.repo_id, commit_message=message, private=args.private,
                                    revision=args.revision, api=api))
        if result['uploaded']:
            summary = f'published {result["folder"]} to {result["url"]} ({result["reason"]})'
        else:
            summary = f'{args.repo_id} unchanged: {result["reason"]}; no commit made'
    print(summary)
    return result


def _cli() -> int:
    try:
        main()
    except PublishError as e:
        print(f'publish: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(_cli())
