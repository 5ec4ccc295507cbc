"""Reading the official PCam HDF5 files: safe under DataLoader workers (fork, spawn, DDP) and fast in batches.

HDF5 handles are opened lazily in the process that reads (never pickled), so the dataset can be sent to spawn
workers; batched reads go through `__getitems__` / `read_batch`, which turn sorted indices into contiguous slices.
"""
import csv
import gzip
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from ..io import atomic_path
from .files import IMAGE_SHAPE, META_COLUMNS, PCamFormatError, normalize_split, split_paths

__all__ = ['PCamDataset', 'ensure_decompressed', 'check_split_files']


def ensure_decompressed(path: Path, progress: bool = True) -> Path:
    """Return `path`, stream-decompressing `path.gz` (as distributed) into it first if only that exists."""
    if path.is_file():
        return path
    gz = path.with_name(path.name + '.gz')
    if not gz.is_file():
        raise FileNotFoundError(f'{path}: PCam file not found (nor {gz.name}); expected the official file layout '
                                f'(get it with `python -m timm_inception_pcam.data download --root {path.parent}`)')
    total = gz.stat().st_size
    try:
        with gzip.open(gz, 'rb') as src, atomic_path(path) as tmp, open(tmp, 'wb') as dst, \
                tqdm(total=total, unit='B', unit_scale=True, desc=f'decompress {gz.name}', disable=not progress,
                     leave=False) as bar:
            raw = src.fileobj  # type: ignore[attr-defined]
            last = 0
            while chunk := src.read(1 << 22):
                dst.write(chunk)
                pos = raw.tell()
                bar.update(pos - last)
                last = pos
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise PCamFormatError(f'{gz}: corrupt or truncated gzip file ({type(e).__name__}: {e}); delete it and '
                              f'download it again') from e
    return path


def _dataset(f: h5py.File, key: str, path: Path) -> h5py.Dataset:
    if key not in f:
        raise PCamFormatError(f'{path}: no dataset {key!r} (found {sorted(f.keys())}); expected the official '
                              f'PCam layout with dataset {key!r}')
    return f[key]


def check_split_files(x_path: Path, y_path: Path) -> tuple[int, np.ndarray]:
    """Validate one split's image and label files; returns (count, int64 labels)."""
    try:
        with h5py.File(x_path, 'r') as fx:
            x = _dataset(fx, 'x', x_path)
            if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE or x.dtype != np.uint8:
                raise PCamFormatError(f'{x_path}: images have shape {x.shape} dtype {x.dtype}; expected '
                                      f'(N, 96, 96, 3) uint8')
            n = int(x.shape[0])
    except OSError as e:
        raise PCamFormatError(f'{x_path}: not a readable HDF5 file ({e}); it may be truncated or corrupt') from e
    try:
        with h5py.File(y_path, 'r') as fy:
            y = _dataset(fy, 'y', y_path)
            if y.ndim < 1 or int(np.prod(y.shape[1:])) != 1:
                raise PCamFormatError(f'{y_path}: labels have shape {y.shape}; expected (N, 1, 1, 1)')
            labels = np.asarray(y[...]).reshape(-1)
    except OSError as e:
        raise PCamFormatError(f'{y_path}: not a readable HDF5 file ({e}); it may be truncated or corrupt') from e
    if labels.shape[0] != n:
        raise PCamFormatError(f'{x_path} holds {n} images but {y_path} holds {labels.shape[0]} labels; '
                              f'expected equal counts')
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise PCamFormatError(f'{y_path}: labels {sorted(set(np.unique(labels).tolist()))[:5]}; expected 0 or 1')
    return n, labels.astype(np.int64)


class PCamDataset:
    """One split of PCam as (image, label) pairs, image a uint8 HWC array or `transform(image)`.

    Args:
        root: Folder holding the official `camelyonpatch_level_2_split_*` files (`.h5` or `.h5.gz`).
        split: 'train', 'valid' or 'test' ('val' / 'validation' accepted).
        transform: Applied to each uint8 (96, 96, 3) array.
        in_memory: Read the whole image array once (the valid and test splits are 0.9 GB each).
        with_meta: Also return the row of the meta CSV (coord_y, coord_x, tumor_patch, center_tumor_patch, wsi).
    """

    def __init__(
            self,
            root: str | os.PathLike,
            split: str,
            transform: Callable[[np.ndarray], Any] | None = None,
            in_memory: bool = False,
            with_meta: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = normalize_split(split)
        paths = split_paths(self.root, self.split)
        self.x_path = ensure_decompressed(paths['x'])
        self.y_path = ensure_decompressed(paths['y'])
        self.meta_path = paths['meta']
        self.transform = transform
        self.with_meta = with_meta
        self._n, self.labels = check_split_files(self.x_path, self.y_path)
        self._images: np.ndarray | None = None
        if in_memory:
            with h5py.File(self.x_path, 'r') as f:
                self._images = np.asarray(f['x'][...])
        self.meta = self._read_meta() if with_meta else None
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def _read_meta(self) -> list[dict[str, Any]]:
        if not self.meta_path.is_file():
            raise FileNotFoundError(f'{self.meta_path}: meta CSV not found (with_meta=True)')
        with open(self.meta_path, newline='') as f:
            reader = csv.DictReader(f)
            missing = [c for c in META_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise PCamFormatError(f'{self.meta_path}: columns {reader.fieldnames}; missing {missing}')
            rows = [{'coord_y': int(r['coord_y']), 'coord_x': int(r['coord_x']),
                     'tumor_patch': r['tumor_patch'] == 'True', 'center_tumor_patch': r['center_tumor_patch'] == 'True',
                     'wsi': r['wsi']} for r in reader]
        if len(rows) != self._n:
            raise PCamFormatError(f'{self.meta_path}: {len(rows)} rows; expected {self._n} (one per image)')
        return rows

    def __len__(self) -> int:
        return self._n

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state['_file'] = None  # handles never cross a process boundary
        state['_pid'] = None
        return state

    def _images_ds(self) -> h5py.Dataset | np.ndarray:
        if self._images is not None:
            return self._images
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.x_path, 'r')
            self._pid = os.getpid()
        return self._file['x']

    def read_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, 96, 96, 3) images and int64 labels, read as few contiguous slices as possible."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -self._n or idx.max() >= self._n):
            raise IndexError(f'{self.x_path}: index out of range for {self._n} patches')
        idx = np.where(idx < 0, idx + self._n, idx)
        images = self._images_ds()
        order = np.argsort(idx, kind='stable')
        sorted_idx = idx[order]
        out = np.empty((idx.size, *IMAGE_SHAPE), dtype=np.uint8)
        if isinstance(images, np.ndarray):
            out[...] = images[idx]
        else:
            # split the sorted indices into runs of consecutive values: one slice read per run
            breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
            start = 0
            for run in np.split(sorted_idx, breaks):
                if run.size:
                    out[order[start:start + run.size]] = images[int(run[0]):int(run[-1]) + 1]
                    start += run.size
        return out, self.labels[idx]

    def _sample(self, image: np.ndarray, label: int, index: int) -> tuple[Any, ...]:
        item = self.transform(image) if self.transform is not None else image
        if self.with_meta:
            return item, label, self.meta[index]  # type: ignore[index]
        return item, label

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        images, labels = self.read_batch([index])
        return self._sample(images[0], int(labels[0]), int(index))

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, ...]]:
        images, labels = self.read_batch(indices)
        return [self._sample(img, int(lab), int(i)) for img, lab, i in zip(images, labels, indices)]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

