"""The `<plan>.json` sidecar written beside every TensorRT engine (format `timm-inception-pcam-engine/1`).

Shared contract with the C++ runtime (export/cpp): a plan is only loaded with its sidecar, on the TensorRT version and
GPU recorded there, and only if the plan's sha256 matches.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timm_inception_pcam.errors import ExportError
from timm_inception_pcam.storage import atomic_write_json, file_sha256

from .spec import IOSpec

__all__ = ['FORMAT', 'Profile', 'DEFAULT_PROFILE', 'Sidecar', 'PlanMismatchError', 'sidecar_path', 'make_sidecar',
           'write_sidecar', 'read_sidecar', 'verify_plan_file', 'check_compatible']

FORMAT = 'timm-inception-pcam-engine/1'
PRECISIONS = ('fp16', 'fp32')


class PlanMismatchError(ExportError):
    """The plan, its sidecar and this machine do not belong together."""


@dataclass(frozen=True)
class Profile:
    """Batch sizes of the TensorRT optimisation profile: kernels are tuned for `opt`, valid from `min` to `max`."""
    min: int = 1
    opt: int = 64
    max: int = 256

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f'optimisation profile must satisfy 1 <= min <= opt <= max, got '
                             f'min={self.min} opt={self.opt} max={self.max}')

    def as_dict(self) -> dict[str, int]:
        return {'min': self.min, 'opt': self.opt, 'max': self.max}


DEFAULT_PROFILE = Profile()


def sidecar_path(plan_path: str | Path) -> Path:
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + '.json')


def make_sidecar(*, model: str, tensorrt_version: str, gpu: dict[str, str], precision: str, spec: IOSpec,
                 profile: Profile, checkpoint_sha256: str | None, onnx_sha256: str, plan_sha256: str) -> dict[str, Any]:
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {PRECISIONS}, got {precision!r}')
    return {
        'format': FORMAT, 'model': model, 'tensorrt_version': tensorrt_version,
        'gpu': {'name': gpu['name'], 'compute_capability': gpu['compute_capability']}, 'precision': precision,
        'input': spec.input_dict(), 'output': spec.output_dict(), 'profile': profile.as_dict(),
        'preprocessing': spec.preprocessing_dict(), 'label_names': list(spec.label_names),
        'sha256': {'checkpoint': checkpoint_sha256, 'onnx': onnx_sha256, 'plan': plan_sha256},
    }


def write_sidecar(plan_path: str | Path, sidecar: dict[str, Any]) -> Path:
    return atomic_write_json(sidecar_path(plan_path), sidecar)


@dataclass(frozen=True)
class Sidecar:
    path: Path
    data: dict[str, Any]
    spec: IOSpec
    profile: Profile

    @property
    def tensorrt_version(self) -> str:
        return self.data['tensorrt_version']

    @property
    def gpu(self) -> dict[str, str]:
        return self.data['gpu']

    @property
    def plan_sha256(self) -> str:
        return self.data['sha256']['plan']


def read_sidecar(plan_path: str | Path, path: str | Path | None = None) -> Sidecar:
    """Load and validate the sidecar of `plan_path` (default `<plan>.json`)."""
    path = Path(path) if path is not None else sidecar_path(plan_path)
    if not path.is_file():
        raise FileNotFoundError(f'{plan_path}: sidecar {path} not found; a plan is only used with the JSON that '
                                'export.trt writes beside it')
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f'{path}: not valid JSON ({e})') from None
    if not isinstance(data, dict) or data.get('format') != FORMAT:
        found = data.get('format') if isinstance(data, dict) else type(data).__name__
        raise ValueError(f'{path}: format is {found!r}, expected {FORMAT!r}')
    for key, kind in (('model', str), ('tensorrt_version', str), ('gpu', dict), ('precision', str),
                      ('profile', dict), ('sha256', dict)):
        if not isinstance(data.get(key), kind):
            raise ValueError(f'{path}: field {key!r} is {data.get(key)!r}, expected a {kind.__name__}')
    if data['precision'] not in PRECISIONS:
        raise ValueError(f'{path}: precision is {data["precision"]!r}, expected one of {PRECISIONS}')
    for key in ('name', 'compute_capability'):
        if not isinstance(data['gpu'].get(key), str):
            raise ValueError(f'{path}: gpu.{key} is {data["gpu"].get(key)!r}, expected a string')
    if not isinstance(data['sha256'].get('plan'), str) or len(data['sha256']['plan']) != 64:
        raise ValueError(f'{path}: sha256.plan is {data["sha256"].get("plan")!r}, expected a sha256 hex digest')
    spec = IOSpec.from_dict(data, str(path))
    try:
        profile = Profile(**{k: int(data['profile'][k]) for k in ('min', 'opt', 'max')})
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f'{path}: profile {data["profile"]!r} is invalid ({e}); expected min <= opt <= max') from None
    return Sidecar(path, data, spec, profile)


def verify_plan_file(plan_path: str | Path, sidecar: Sidecar) -> bytes:
    """The plan's bytes, once its sha256 matches the sidecar (catches truncated or swapped plans)."""
    plan_path = Path(plan_path)
    if not plan_path.is_file():
        raise FileNotFoundError(f'{plan_path}: plan file not found')
    digest = file_sha256(plan_path)
    if digest != sidecar.plan_sha256:
        raise PlanMismatchError(f'{plan_path}: sha256 {digest[:16]}... ({plan_path.stat().st_size} bytes) does not '
                                f'match {sidecar.path} (sha256.plan {sidecar.plan_sha256[:16]}...): the plan is '
                                'truncated or is not the one this sidecar describes')
    return plan_path.read_bytes()


def check_compatible(sidecar: Sidecar, tensorrt_version: str, gpu: dict[str, str]) -> None:
    """Refuse a plan built by another TensorRT version or for another GPU (plans are not portable)."""
    rebuild = 'rebuild it on this machine with: python -m export.trt --fp16 --from-onnx <model>.fp16.onnx'
    if sidecar.tensorrt_version != tensorrt_version:
        raise PlanMismatchError(f'{sidecar.path}: plan built with TensorRT {sidecar.tensorrt_version}, this machine '
                                f'has TensorRT {tensorrt_version}; {rebuild}')
    built, here = sidecar.gpu, gpu
    if built['compute_capability'] != here['compute_capability'] or built['name'] != here['name']:
        raise PlanMismatchError(f'{sidecar.path}: plan built for {built["name"]} (compute capability '
                                f'{built["compute_capability"]}), this GPU is {here["name"]} (compute capability '
                                f'{here["compute_capability"]}); {rebuild}')
