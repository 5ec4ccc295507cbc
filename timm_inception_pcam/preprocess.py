"""Input preprocessing and batching shared by every inference path (PyTorch, onnxruntime, TensorRT runners)."""
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .constants import PCAM_INPUT_SIZE, PCAM_MEAN, PCAM_STD

__all__ = ['check_patches', 'preprocess_patches', 'batch_slices', 'model_normalization']


def check_patches(patches: np.ndarray, source: str = 'input') -> np.ndarray:
    """Validate raw PCam patches: uint8, NHWC, 96x96x3 (a single HWC patch is promoted to a batch of one)."""
    if not isinstance(patches, np.ndarray):
        raise TypeError(f'{source}: expected a numpy array of uint8 patches, got {type(patches).__name__}')
    if patches.ndim == 3:
        patches = patches[None]
    expected = (PCAM_INPUT_SIZE[1], PCAM_INPUT_SIZE[2], PCAM_INPUT_SIZE[0])
    if patches.ndim != 4 or patches.shape[1:] != expected:
        raise ValueError(f'{source}: expected patches of shape (N, {", ".join(map(str, expected))}) (NHWC), '
                         f'got {tuple(patches.shape)}')
    if patches.dtype != np.uint8:
        raise ValueError(f'{source}: expected dtype uint8 (0..255), got {patches.dtype}')
    return patches


def preprocess_patches(
        patches: np.ndarray,
        mean: Sequence[float] = PCAM_MEAN,
        std: Sequence[float] = PCAM_STD,
        source: str = 'input',
) -> np.ndarray:
    """uint8 NHWC patches -> float32 NCHW normalised as (x / 255 - mean) / std."""
    patches = check_patches(patches, source)
    scale = 1.0 / (255.0 * np.asarray(std, dtype=np.float32))
    shift = np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)
    out = patches.astype(np.float32) * scale - shift
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def batch_slices(n: int, max_batch: int) -> Iterator[slice]:
    """Slices covering range(n) in consecutive batches of at most `max_batch` items."""
    if max_batch < 1:
        raise ValueError(f'max_batch must be at least 1, got {max_batch}')
    for start in range(0, n, max_batch):
        yield slice(start, min(start + max_batch, n))


def model_normalization(model: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std `model` expects: its pretrained_cfg as timm resolves it, PCam's statistics without one."""
    if not getattr(model, 'pretrained_cfg', None):
        return PCAM_MEAN, PCAM_STD
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return tuple(float(v) for v in cfg['mean']), tuple(float(v) for v in cfg['std'])
