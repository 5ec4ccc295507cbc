"""The `<plan>.json` sidecar written beside every TensorRT engine (format `timm-inception-pcam-engine/1`).

Shared contract with the C++ runtime (export/cpp/src/sidecar.cpp): a plan is only loaded with its sidecar, only if
the plan's sha256 matches, and only where its TensorRT version and GPU allow. Both readers apply the same rules and
say the same things (field path, value, expectation); the fixtures in tests/golden/sidecar/ drive the Python and the
C++ tests alike. The rules:

- every field has its JSON type, no coercion: integers are integers (not booleans, floats or strings), mean/std are
  three finite numbers, `label_names` a list of strings with one name per output class;
- `output.activation`: `softmax` (the engine returns logits) or `none` (it returns probabilities already);
- `version_compatible` (optional, default false): the plan was built with TensorRT's VERSION_COMPATIBLE flag;
- TensorRT version: an ordinary plan runs only on the release (major.minor.patch) that built it; a version-compatible
  plan on that release or a later one of the same major version;
- GPU: another compute capability is refused; another GPU name with the same compute capability is a warning.
"""
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timm_inception_pcam.errors import ExportError
from timm_inception_pcam.storage import atomic_write_json, file_sha256

from .spec import ACTIVATIONS, RAW_SCALE, IOSpec

__all__ = ['FORMAT', 'Profile', 'DEFAULT_PROFILE', 'Sidecar', 'SidecarError', 'PlanMismatchError',
           'sidecar_path', 'make_sidecar', 'write_sidecar', 'parse_sidecar', 'read_sidecar', 'verify_plan_file',
           'check_tensorrt_version', 'check_gpu', 'check_compatible', 'version_triple']

_logger = logging.getLogger(__name__)

FORMAT = 'timm-inception-pcam-engine/1'
PRECISIONS = ('fp16', 'fp32')
_SHA256 = re.compile(r'[0-9a-f]{64}')
_REBUILD = 'rebuild it on this machine with: python -m export.trt --fp16 --from-onnx <model>.fp16.onnx'


class SidecarError(ExportError, ValueError):
    """A sidecar is missing, not JSON, or breaks the engine sidecar contract."""


class SidecarMissingError(ExportError, FileNotFoundError):
    """A plan's sidecar (or the plan itself) does not exist."""


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
                 profile: Profile, checkpoint_sha256: str | None, onnx_sha256: str, plan_sha256: str,
                 version_compatible: bool = False, training_data_provenance: str = 'unknown') -> dict[str, Any]:
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {PRECISIONS}, got {precision!r}')
    return {
        'format': FORMAT, 'model': model, 'tensorrt_version': tensorrt_version,
        'gpu': {'name': gpu['name'], 'compute_capability': gpu['compute_capability']}, 'precision': precision,
        'version_compatible': bool(version_compatible),
        'input': spec.input_dict(), 'output': spec.output_dict(), 'profile': profile.as_dict(),
        'preprocessing': spec.preprocessing_dict(), 'label_names': list(spec.label_names),
        'sha256': {'checkpoint': checkpoint_sha256, 'onnx': onnx_sha256, 'plan': plan_sha256},
        'training_data_provenance': training_data_provenance,
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
    def model(self) -> str:
        return self.data['model']

    @property
    def tensorrt_version(self) -> str:
        return self.data['tensorrt_version']

    @property
    def gpu(self) -> dict[str, str]:
        return self.data['gpu']

    @property
    def precision(self) -> str:
        return self.data['precision']

    @property
    def activation(self) -> str:
        return self.data['output']['activation']

    @property
    def version_compatible(self) -> bool:
        return bool(self.data.get('version_compatible', False))

    @property
    def plan_sha256(self) -> str:
        return self.data['sha256']['plan']


# ---- strict reading: the same checks, in the same order and words, as export/cpp/src/sidecar.cpp -----------------

def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return 'a boolean'
    if isinstance(value, int):
        return 'an integer'
    if isinstance(value, float):
        return 'a number'
    return {str: 'a string', list: 'an array', dict: 'an object', type(None): 'a null'}.get(type(value), 'a value')


def _shown(value: Any) -> str:
    text = json.dumps(value, separators=(',', ':'), ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + '...'


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Fields:
    """Typed access to one JSON document; messages name the file and the dotted field path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> SidecarError:
        return SidecarError(f"{self.source}: field '{path}' {message}")

    def get(self, obj: Any, parent: str, key: str, expected: str) -> Any:
        path = f'{parent}.{key}' if parent else key
        if not isinstance(obj, dict):
            raise self.fail(parent, f'is {_type_name(obj)} ({_shown(obj)}), expected an object')
        if key not in obj:
            raise SidecarError(f"{self.source}: missing field '{path}' ({expected})")
        return obj[key]

    def typed(self, obj: Any, parent: str, key: str, ok, expected: str) -> Any:
        value = self.get(obj, parent, key, expected)
        if not ok(value):
            raise self.fail(_join(parent, key), f'is {_type_name(value)} ({_shown(value)}), expected {expected}')
        return value

    def object(self, obj: Any, parent: str, key: str) -> dict:
        return self.typed(obj, parent, key, lambda v: isinstance(v, dict), 'an object')

    def string(self, obj: Any, parent: str, key: str) -> str:
        return self.typed(obj, parent, key, lambda v: isinstance(v, str), 'a string')

    def integer(self, obj: Any, parent: str, key: str) -> int:
        return self.typed(obj, parent, key, _is_int, 'an integer')

    def number(self, obj: Any, parent: str, key: str) -> float:
        return float(self.typed(obj, parent, key, _is_number, 'a number'))

    def boolean(self, obj: Any, parent: str, key: str) -> bool:
        return self.typed(obj, parent, key, lambda v: isinstance(v, bool), 'true or false')

    def choice(self, obj: Any, parent: str, key: str, allowed: tuple[str, ...]) -> str:
        value = self.string(obj, parent, key)
        if value not in allowed:
            options = ', '.join(f"'{o}'" for o in allowed)
            raise self.fail(_join(parent, key), f"is '{value}', expected one of {options}")
        return value

    def shape(self, obj: Any, parent: str, key: str) -> list[int]:
        value = self.typed(obj, parent, key, lambda v: isinstance(v, list), 'a list of integers')
        if not all(_is_int(d) for d in value):
            raise self.fail(_join(parent, key), f'is {_shown(value)}, expected a list of integers')
        return value

    def triple(self, obj: Any, parent: str, key: str) -> tuple[float, float, float]:
        value = self.typed(obj, parent, key, lambda v: isinstance(v, list), 'a list of 3 numbers (R, G, B)')
        if len(value) != 3:
            raise self.fail(_join(parent, key), f'has {len(value)} values ({_shown(value)}), expected 3 (R, G, B)')
        if not all(_is_number(v) and math.isfinite(v) for v in value):
            raise self.fail(_join(parent, key), f'is {_shown(value)}, expected 3 finite numbers')
        return float(value[0]), float(value[1]), float(value[2])


def _join(parent: str, key: str) -> str:
    return f'{parent}.{key}' if parent else key


def _split_version(text: str) -> list[int] | None:
    parts = text.split('.')
    if not all(p.isascii() and p.isdigit() and len(p) <= 6 for p in parts):
        return None
    return [int(p) for p in parts]


def version_triple(text: str) -> tuple[int, int, int] | None:
    """'11.4.0.106' -> (11, 4, 0); None unless the text is at least three dot-separated integers."""
    parts = _split_version(text)
    return (parts[0], parts[1], parts[2]) if parts and len(parts) >= 3 else None


def _reject_constant(name: str) -> Any:
    raise ValueError(f'{name} is not JSON')


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f'number overflow parsing {text!r}')
    return value


def _tensor(f: _Fields, root: dict, key: str, with_layout: bool) -> dict[str, Any]:
    node = f.object(root, '', key)
    name = f.string(node, key, 'name')
    if not name:
        raise f.fail(f'{key}.name', "is empty, expected the engine's tensor name")
    tensor = {'name': name, 'shape': f.shape(node, key, 'shape'), 'dtype': f.choice(node, key, 'dtype',
                                                                                   ('float32', 'uint8'))}
    if with_layout:
        tensor['layout'] = f.choice(node, key, 'layout', ('NCHW', 'NHWC'))
    return tensor


def parse_sidecar(text: str, source: str) -> dict[str, Any]:
    """Parse and validate a sidecar's JSON text; every problem raises SidecarError naming `source` and the field."""
    try:
        root = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, NaN/Infinity, overflowing numbers
        raise SidecarError(f'{source}: not valid JSON ({e})') from None
    if not isinstance(root, dict):
        raise SidecarError(f'{source}: expected a JSON object at the top level, got {_type_name(root)}')
    f = _Fields(source)
    fmt = f.string(root, '', 'format')
    if fmt != FORMAT:
        raise f.fail('format', f"is '{fmt}', expected '{FORMAT}' (a sidecar written by python -m export.trt)")
    f.string(root, '', 'model')
    version = f.string(root, '', 'tensorrt_version')
    if version_triple(version) is None:
        raise f.fail('tensorrt_version', f"is '{version}', expected a version such as '11.4.0.106'")
    gpu = f.object(root, '', 'gpu')
    f.string(gpu, 'gpu', 'name')
    capability = f.string(gpu, 'gpu', 'compute_capability')
    parts = _split_version(capability)
    if not parts or len(parts) != 2:
        raise f.fail('gpu.compute_capability', f"is '{capability}', expected 'major.minor' such as '9.0'")
    f.choice(root, '', 'precision', PRECISIONS)
    if 'version_compatible' in root:
        f.boolean(root, '', 'version_compatible')

    pre = f.object(root, '', 'preprocessing')
    baked_in = f.boolean(pre, 'preprocessing', 'baked_in')
    f.choice(pre, 'preprocessing', 'raw_layout', ('NHWC',))
    f.choice(pre, 'preprocessing', 'raw_dtype', ('uint8',))
    scale = f.number(pre, 'preprocessing', 'scale')
    if scale != RAW_SCALE:
        raise f.fail('preprocessing.scale', f'is {scale}, expected {RAW_SCALE}')
    f.triple(pre, 'preprocessing', 'mean')
    std = f.triple(pre, 'preprocessing', 'std')
    for value in std:
        if not value > 0:
            raise f.fail('preprocessing.std', f'contains {value}, expected positive values')

    inp = _tensor(f, root, 'input', True)
    want = IOSpec(baked_in=baked_in).input_dict()
    because = f' for preprocessing.baked_in={"true" if baked_in else "false"}'
    if inp['shape'] != want['shape']:
        raise f.fail('input.shape', f'is {_list(inp["shape"])}, expected {_list(want["shape"])}{because}')
    for k in ('dtype', 'layout'):
        if inp[k] != want[k]:
            raise f.fail(f'input.{k}', f"is '{inp[k]}', expected '{want[k]}'{because}")

    out = _tensor(f, root, 'output', False)
    f.choice(f.object(root, '', 'output'), 'output', 'activation', ACTIVATIONS)
    if out['dtype'] != 'float32':
        raise f.fail('output.dtype', f"is '{out['dtype']}', expected 'float32'")
    if len(out['shape']) != 2 or out['shape'][0] != -1 or out['shape'][1] < 2:
        raise f.fail('output.shape', f'is {_list(out["shape"])}, expected [-1, classes] with classes >= 2')
    if out['name'] == inp['name']:
        raise f.fail('output.name', f"is '{out['name']}', the same as input.name")

    labels = f.typed(root, '', 'label_names', lambda v: isinstance(v, list), 'a list of strings')
    if not all(isinstance(label, str) for label in labels):
        raise f.fail('label_names', f'is {_shown(labels)}, expected a list of strings')
    if len(labels) != out['shape'][1]:
        raise f.fail('label_names', f'has {len(labels)} names ({_shown(labels)}), expected {out["shape"][1]} '
                                    'to match output.shape')

    profile = f.object(root, '', 'profile')
    lo, opt, hi = (f.integer(profile, 'profile', k) for k in ('min', 'opt', 'max'))
    if not 1 <= lo <= opt <= hi:
        raise f.fail('profile', f'is min={lo} opt={opt} max={hi}, expected 1 <= min <= opt <= max')

    sha = f.object(root, '', 'sha256')
    checkpoint = f.typed(sha, 'sha256', 'checkpoint', lambda v: v is None or isinstance(v, str), 'a string or null')
    for key in ('onnx', 'plan'):
        value = f.string(sha, 'sha256', key)
        if not _SHA256.fullmatch(value):
            raise f.fail(f'sha256.{key}', f"is '{value}', expected 64 lowercase hexadecimal digits")
    if checkpoint is not None and not _SHA256.fullmatch(checkpoint):
        raise f.fail('sha256.checkpoint', f"is '{checkpoint}', expected 64 lowercase hexadecimal digits")
    return root


def _list(values: list[int]) -> str:
    return '[' + ', '.join(str(v) for v in values) + ']'


def read_sidecar(plan_path: str | Path, path: str | Path | None = None) -> Sidecar:
    """Load and validate the sidecar of `plan_path` (default `<plan>.json`)."""
    path = Path(path) if path is not None else sidecar_path(plan_path)
    if not path.is_file():
        raise SidecarMissingError(f'{plan_path}: sidecar {path} not found; a plan is only used with the JSON that '
                                  'export.trt writes beside it')
    try:
        text = path.read_bytes().decode('utf-8')
    except UnicodeDecodeError as e:
        raise SidecarError(f'{path}: not valid JSON ({e})') from None
    data = parse_sidecar(text, str(path))
    spec = IOSpec.from_dict(data, str(path))
    profile = Profile(**{k: data['profile'][k] for k in ('min', 'opt', 'max')})
    return Sidecar(path, data, spec, profile)


def verify_plan_file(plan_path: str | Path, sidecar: Sidecar) -> bytes:
    """The plan's bytes, once its sha256 matches the sidecar (catches truncated or swapped plans)."""
    plan_path = Path(plan_path)
    if not plan_path.is_file():
        raise SidecarMissingError(f'{plan_path}: plan file not found')
    digest = file_sha256(plan_path)
    if digest != sidecar.plan_sha256:
        raise PlanMismatchError(f'{plan_path}: sha256 {digest[:16]}... ({plan_path.stat().st_size} bytes) does not '
                                f'match {sidecar.path} (sha256.plan {sidecar.plan_sha256[:16]}...): the plan is '
                                'truncated or is not the one this sidecar describes')
    return plan_path.read_bytes()


def check_tensorrt_version(sidecar: Sidecar, tensorrt_version: str) -> None:
    """Refuse a TensorRT release the plan cannot load in (see the module docstring for the rule)."""
    built, here = version_triple(sidecar.tensorrt_version), version_triple(tensorrt_version)
    if built is None or here is None:
        raise PlanMismatchError(f'{sidecar.path}: cannot compare TensorRT versions {sidecar.tensorrt_version!r} '
                                f'(plan) and {tensorrt_version!r} (this machine)')
    if sidecar.version_compatible:
        if here[0] != built[0] or here < built:
            raise PlanMismatchError(f'{sidecar.path}: version-compatible plan built with TensorRT '
                                    f'{sidecar.tensorrt_version}, this machine has TensorRT {tensorrt_version}; '
                                    f'it loads in TensorRT {built[0]}.x from {".".join(map(str, built))} '
                                    f'on; {_REBUILD}')
    elif here != built:
        raise PlanMismatchError(f'{sidecar.path}: plan built with TensorRT {sidecar.tensorrt_version}, this machine '
                                f'has TensorRT {tensorrt_version}; a plan only loads in the TensorRT release that '
                                f'built it; {_REBUILD}')


def check_gpu(sidecar: Sidecar, gpu: dict[str, str]) -> str | None:
    """Refuse another compute capability; another GPU name with the same capability returns (and logs) a warning."""
    built = sidecar.gpu
    if built['compute_capability'] != gpu['compute_capability']:
        raise PlanMismatchError(f'{sidecar.path}: plan built for {built["name"]} (compute capability '
                                f'{built["compute_capability"]}), this GPU is {gpu["name"]} (compute capability '
                                f'{gpu["compute_capability"]}); {_REBUILD}')
    if built['name'] != gpu['name']:
        warning = (f'warning: the plan was built on {built["name"]}, running on {gpu["name"]} (same compute '
                   f'capability {gpu["compute_capability"]}); performance may differ')
        _logger.warning('%s', warning)
        return warning
    return None


def check_compatible(sidecar: Sidecar, tensorrt_version: str, gpu: dict[str, str]) -> str | None:
    """Both checks: TensorRT release, then GPU. Returns the GPU warning, if any."""
    check_tensorrt_version(sidecar, tensorrt_version)
    return check_gpu(sidecar, gpu)
