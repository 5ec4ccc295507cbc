"""One precision vocabulary for training, evaluation and inference: `fp32`, `bf16`, `fp16`, `int8`, and `auto`.

Older spellings (`float32`, `bfloat16`, `float16`, `none`) are accepted as aliases so existing command lines keep
working; everything recorded (checkpoints, reports, sidecars) uses the canonical names.
"""
import torch

from .device import cpu_has_native_bf16
from .errors import UsageError

__all__ = ['PRECISIONS', 'AUTOCAST_PRECISIONS', 'parse_precision', 'autocast_dtype', 'choose_precision']

PRECISIONS = ('fp32', 'bf16', 'fp16', 'int8')
AUTOCAST_PRECISIONS = ('auto', 'fp32', 'bf16', 'fp16')
_ALIASES = {
    'float32': 'fp32', 'none': 'fp32', 'fp32': 'fp32',
    'bfloat16': 'bf16', 'bf16': 'bf16',
    'float16': 'fp16', 'half': 'fp16', 'fp16': 'fp16',
    'int8': 'int8', 'auto': 'auto',
}
_DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def parse_precision(value: str, allowed: tuple[str, ...] = AUTOCAST_PRECISIONS, name: str = 'precision') -> str:
    """Canonical name of `value` (aliases folded); UsageError unless it is one of `allowed`."""
    canonical = _ALIASES.get(str(value).strip().lower())
    if canonical is None or canonical not in allowed:
        raise UsageError(f'{name} {value!r} not supported: expected one of {", ".join(allowed)}')
    return canonical


def choose_precision(device: torch.device | str, requested: str = 'auto') -> str:
    """The autocast precision to run on `device`: `auto` is bf16 on CPUs that compute it in hardware (AMX,
    AVX-512 BF16) and on bf16-capable GPUs, fp16 on older GPUs, fp32 elsewhere; an explicit request is returned
    canonical."""
    requested = parse_precision(requested)
    if requested != 'auto':
        return requested
    device = torch.device(device)
    if device.type == 'cuda':
        return 'bf16' if torch.cuda.is_bf16_supported() else 'fp16'
    if device.type == 'cpu' and cpu_has_native_bf16():
        return 'bf16'
    return 'fp32'


def autocast_dtype(precision: str) -> torch.dtype | None:
    """torch autocast dtype for a canonical autocast precision (None: float32, no autocast)."""
    if precision not in _DTYPES:
        raise UsageError(f'precision {precision!r} has no autocast dtype: expected one of {", ".join(_DTYPES)}')
    return _DTYPES[precision]
