"""Test-time augmentation for any runner: the dihedral views of uint8 NHWC patches, scored view by view.

View k is rotation by 90 x (k % 4) degrees, then a horizontal flip if k >= 4 (the order of
`timm_inception_pcam.data.dihedral` on NCHW tensors); view 0 is the patch as stored. Preprocessing is per pixel,
so transforming the raw patches gives exactly the views of the normalised ones.
"""
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from ..errors import InferenceError, UsageError
from ..preprocess import check_patches
from .base import Runner, softmax

__all__ = ['MAX_TTA', 'dihedral_patches', 'view_probabilities']

MAX_TTA = 8


class PatchSource(Protocol):
    def __len__(self) -> int: ...

    def read_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def dihedral_patches(patches: np.ndarray, k: int) -> np.ndarray:
    """The k-th dihedral view (0..7) of uint8 (N, H, W, C) patches, contiguous."""
    if not 0 <= k < MAX_TTA:
        raise UsageError(f'dihedral view index must be in 0..7, got {k}')
    x = np.rot90(patches, k % 4, axes=(1, 2))
    return np.ascontiguousarray(x[:, :, ::-1] if k >= 4 else x)


class _Batches(torch.utils.data.Dataset):
    """Batch b of a patch source as uint8 NHWC patches; runs in DataLoader workers (HDF5 reads overlap inference)."""

    def __init__(self, source: PatchSource | np.ndarray, n: int, batch_size: int):
        self.source, self.n, self.batch_size = source, n, batch_size

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __getitem__(self, b: int) -> np.ndarray:
        start, stop = b * self.batch_size, min((b + 1) * self.batch_size, self.n)
        if isinstance(self.source, np.ndarray):
            patches = self.source[start:stop]
        else:
            patches, _ = self.source.read_batch(np.arange(start, stop))
        return check_patches(patches, source=f'patches {start}..{stop - 1}')


def view_probabilities(
        runner: Runner,
        data: PatchSource | np.ndarray,
        batch_size: int = 256,
        tta: int = 1,
        *,
        workers: int = 0,
        limit: int | None = None,
        progress: bool | None = None,
        desc: str = 'predict',
) -> np.ndarray:
    """Class-1 (metastatic) probability of every patch of `data` under each of the first `tta` dihedral views.

    `data` is a PCamDataset (anything with ``read_batch``) or a uint8 NHWC array; `limit` scores only its first
    patches. Returns float64 (tta, N); average over axis 0 for the TTA probability. The runner must be binary.
    """
    if not 1 <= tta <= MAX_TTA:
        raise UsageError(f'tta must be between 1 and {MAX_TTA} (the dihedral group), got {tta}')
    if batch_size < 1:
        raise UsageError(f'batch_size must be at least 1, got {batch_size}')
    n = len(data) if limit is None else min(limit, len(data))
    loader = torch.utils.data.DataLoader(_Batches(data, n, batch_size), batch_size=None, shuffle=False,
                                         num_workers=workers, collate_fn=_as_is,
                                         persistent_workers=False)
    views = np.empty((tta, n), dtype=np.float64)
    start = 0
    with tqdm(total=n, desc=desc, unit='patch', disable=None if progress is None else not progress,
              leave=False) as bar:
        for patches in loader:
            stop = start + len(patches)
            for k in range(tta):
                logits = np.asarray(runner.logits(dihedral_patches(patches, k) if k else patches))
                if logits.shape != (len(patches), 2):
                    raise InferenceError(f'{runner.spec.backend} runner returned logits of shape '
                                         f'{tuple(logits.shape)} for a batch of {len(patches)}, expected '
                                         f'({len(patches)}, 2): the evaluation scores binary PCam models')
                views[k, start:stop] = softmax(logits.astype(np.float64))[:, 1]
            start = stop
            bar.update(len(patches))
    return views


def _as_is(batch: np.ndarray) -> np.ndarray:
    """The batch as the dataset made it (uint8 numpy, not converted to a tensor)."""
    return batch
