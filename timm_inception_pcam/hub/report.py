"""What publishing checks before writing anything: the evaluation report, its match to the checkpoint, the weights,
the data provenance, and every path a report or model file names (data, resolved inside its own folder)."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..constants import SPLITS
from ..data.provenance import PROVENANCES, provenance_of
from ..errors import UsageError

__all__ = [
    'PublishError', 'PROVENANCES', 'CARD_METRICS', 'TABLE_METRICS', 'REQUIRED_PLOTS', 'OPTIONAL_PLOTS', 'ONNX_NAME',
    'WEIGHTS_NAME', 'provenance_of', 'report_provenance', 'path_inside', 'read_report', 'check_report_checkpoint',
    'check_finite', 'check_model_name', 'plot_paths', 'inspect_onnx', 'finite_number',
]

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


class PublishError(UsageError):
    """Input that must not be published (missing / mismatched report, bad weights, unknown model, ...)."""


def check_repo_id(repo_id: str) -> None:
    """PublishError unless `repo_id` is ORG/NAME as the Hub accepts it (huggingface_hub's own rules)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        ok = repo_id.count('/') == 1
    except HFValidationError:
        ok = False
    if not ok:
        raise PublishError(f'--repo-id {repo_id!r}: expected ORG/NAME (letters, digits, \'-\', \'_\' or \'.\', '
                           f'not starting or ending with \'-\' or \'.\')')


def finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def report_provenance(report: Mapping[str, Any]) -> str:
    """The provenance of the data a report was measured on; a report that does not record it is 'unknown'."""
    data = report.get('data')
    return provenance_of(data.get('provenance') if isinstance(data, Mapping) else None)


def path_inside(folder: str | os.PathLike, name: Any, *, what: str, source: str | os.PathLike) -> Path:
    """`folder / name` for a relative `name` read from a file, refused unless it stays inside `folder`.

    Absolute names, `..` components and symlinks that lead out of the folder are refused: a report or model file
    is data, and must not make this command read (and publish) files from elsewhere.
    """
    if not isinstance(name, str) or not name or '\0' in name:
        raise PublishError(f'{source}: {what} is {name!r}, expected a file name relative to {folder}')
    rel = Path(name)
    if rel.is_absolute() or rel.drive or '..' in rel.parts or name.startswith('~'):
        raise PublishError(f'{source}: {what} {name!r} is not a plain relative path; expected a file inside {folder}')
    base = Path(folder).resolve()
    path = Path(folder) / rel
    resolved = path.resolve()
    if not resolved.is_relative_to(base):
        raise PublishError(f'{source}: {what} {name!r} leads out of {folder} (to {resolved}, through a symlink); '
                           f'expected a file inside it')
    return path


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate an evaluation report (`python -m timm_inception_pcam.evaluate`)."""
    from ..evaluate import REPORT_FORMAT

    path = Path(path)
    if path.is_dir():
        raise PublishError(f'{path}: a folder, expected its report.json (written by '
                           f'`python -m timm_inception_pcam.evaluate`)')
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
        if not finite_number(metrics.get(key)):
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


def check_model_name(name: str | None, source: str) -> str:
    import timm

    if not name:
        raise PublishError(f'{source}: the checkpoint records no architecture ("arch"); pass --model')
    if not timm.is_model(name):
        raise PublishError(f'unknown model {name!r} (from {source}): not registered in timm; expected one of this '
                           f'project\'s models ({", ".join(timm.list_models("*_pcam"))}) or another registered timm '
                           f'model')
    return name


def plot_paths(report: Mapping[str, Any], report_path: Path, plots_dir: Path | None) -> dict[str, Path]:
    """The report's ROC / PR (required) and confusion (optional) plots, each inside the report's folder or
    `plots_dir`."""
    plots = report.get('plots') or {}
    if not isinstance(plots, Mapping):
        raise PublishError(f'{report_path}: plots is {type(plots).__name__}, expected an object of file names')
    base = plots_dir if plots_dir is not None else report_path.parent
    found: dict[str, Path] = {}
    for key in REQUIRED_PLOTS + OPTIONAL_PLOTS:
        name = plots.get(key)
        if not name:
            if key in REQUIRED_PLOTS:
                raise PublishError(f'{report_path}: plots.{key} is missing; the model card needs the ROC and PR plots '
                                   f'(re-run the evaluation with plots)')
            continue
        if plots_dir is not None and isinstance(name, str):
            name = name.replace('\\', '/').rsplit('/', 1)[-1]  # --plots-dir: the plots by file name
        path = path_inside(base, name, what=f'plots.{key}', source=report_path)
        if not path.is_file():
            if key in REQUIRED_PLOTS:
                raise PublishError(f'{path}: {key} plot named by {report_path} not found (pass --plots-dir DIR if the '
                                   f'plots live elsewhere)')
            continue
        found[key] = path
    return found


def inspect_onnx(onnx_path: Path) -> dict[str, Any]:
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
        path = path_inside(onnx_path.parent, location, what='external data location', source=onnx_path)
        if Path(location).as_posix() in ('config.json', 'README.md', WEIGHTS_NAME, ONNX_NAME):
            raise PublishError(f'{onnx_path}: external data location {location!r}, expected a file name other than '
                               f'the published folder\'s own files')
        if not path.is_file():
            raise PublishError(f'{onnx_path}: external data file {path} not found')

    if not proto.graph.node:  # protobuf parses many other files as an empty model
        raise PublishError(f'{onnx_path}: not an ONNX model (no graph); expected the .onnx written by export.onnx')
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
