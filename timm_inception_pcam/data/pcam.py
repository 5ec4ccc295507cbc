"""Reading the official PCam HDF5 files: safe under DataLoader workers (fork, spawn, DDP) and fast in batches.

HDF5 handles are opened lazily in the process that reads (never pickled), so the dataset can be sent to spawn
workers; batched reads go through `__getitems__` / `read_batch`, which turn sorted indices into contiguous slices.
"""
import csv
import gzip
import hashlib
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import h5py
import numpy as np
from tqdm import tqdm

from ..errors import MissingFileError
from ..storage import atomic_path
from .download import GZ_MD5, H5_MD5
from .files import IMAGE_SHAPE, META_COLUMNS, ChecksumError, PCamFormatError, normalize_split, split_paths
from .provenance import record_verified, split_provenance

HDF5_SIGNATURE = b'\x89HDF\r\n\x1a\n'

__all__ = ['PCamDataset', 'ensure_decompressed', 'check_split_files', 'read_meta_rows']


class _HashingReader(io.RawIOBase):
    """Read-through wrapper hashing (md5) and counting the compressed bytes as gzip consumes them."""

    def __init__(self, raw: BinaryIO, bar: tqdm) -> None:
        self.raw, self.bar, self.md5 = raw, bar, hashlib.md5()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)
        if n:
            self.md5.update(memoryview(buffer)[:n])
            self.bar.update(n)
        return n or 0


def ensure_decompressed(path: Path, progress: bool = True, md5: str | None = None) -> Path:
    """Return `path`, stream-decompressing `path.gz` (as distributed) into it first if only that exists.

    The gzip CRC-32 and length are always checked; `md5` (of the `.gz` file) is checked too when given. The
    output appears only when both checks pass (temporary name, then rename); memory use stays at a few MB.
    """
    if path.is_file():
        return path
    gz = path.with_name(path.name + '.gz')
    if path.is_dir():
        raise MissingFileError(f'{path}: a folder, expected the PCam HDF5 file of that name')
    if not gz.is_file():
        raise MissingFileError(f'{path}: PCam file not found (nor {gz.name}); expected the official file layout '
                                f'(get it with `python -m timm_inception_pcam.data download --root {path.parent}`)')
    total = gz.stat().st_size
    with open(gz, 'rb') as head:
        if head.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
            raise PCamFormatError(f'{gz}: an uncompressed HDF5 file named .gz (a browser or download tool may have '
                                  f'decompressed it already); rename it to {path.name}')
    try:
        # disable=None: no bar when stderr is not a terminal (a log file kept its text before an error line)
        with open(gz, 'rb') as raw, tqdm(total=total, unit='B', unit_scale=True, desc=f'decompress {gz.name}',
                                          disable=None if progress else True, leave=False) as bar, \
                atomic_path(path) as tmp:
            reader = _HashingReader(raw, bar)
            with gzip.GzipFile(fileobj=io.BufferedReader(reader, 1 << 20), mode='rb') as src, open(tmp, 'wb') as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
                while reader.read(1 << 20):  # trailing bytes gzip did not need still count for the md5
                    pass
            if md5 is not None and reader.md5.hexdigest() != md5.lower():
                raise ChecksumError(f'{gz}: md5 {reader.md5.hexdigest()}, expected {md5.lower()}; the file is '
                                    f'corrupt or not the official one: delete it and download it again (a file '
                                    f'of your own, e.g. from `data synth --gzip`, is decompressed with --no-md5)')
        official = md5 is not None and GZ_MD5.get(gz.name) == md5.lower()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise PCamFormatError(f'{gz}: corrupt or truncated gzip file ({type(e).__name__}: {e}); delete it and '
                              f'download it again') from e
    if official:  # the official .gz, verified: its content is the official .h5
        record_verified(path, H5_MD5[path.name])
    return path


def _dataset(f: h5py.File, key: str, path: Path) -> h5py.Dataset:
    if key not in f:
        raise PCamFormatError(f'{path}: no dataset {key!r} (found {sorted(f.keys())}); expected the official '
                              f'PCam layout with dataset {key!r}')
    return f[key]


def check_split_files(x_path: Path, y_path: Path) -> tuple[int, np.ndarray]:
    """Validate one split's image and label files (decompressing `.h5.gz` ones first); returns (count, labels)."""
    x_path, y_path = ensure_decompressed(Path(x_path)), ensure_decompressed(Path(y_path))
    try:
        with h5py.File(x_path, 'r') as fx:
            x = _dataset(fx, 'x', x_path)
            if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE or x.dtype != np.uint8:
                raise PCamFormatError(f'{x_path}: images have shape {x.shape} dtype {x.dtype}; expected '
                                      f'(N, 96, 96, 3) uint8')
            n = int(x.shape[0])
            if n == 0:
                raise PCamFormatError(f'{x_path}: holds no images (shape {x.shape}); expected (N, 96, 96, 3) with '
                                      f'N >= 1')
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


def read_meta_rows(path: Path, n: int | None = None) -> list[dict[str, Any]]:
    """Rows of a `_meta.csv`: coord_y, coord_x (int), tumor_patch, center_tumor_patch (bool), wsi; `n` rows if given."""
    if not path.is_file():
        raise MissingFileError(f'{path}: meta CSV not found; expected the official {path.name} beside the .h5 files')
    try:
        with open(path, newline='') as f:
            reader = csv.DictReader(f)
            missing = [c for c in META_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise PCamFormatError(f'{path}: columns {reader.fieldnames}; expected {list(META_COLUMNS)} '
                                      f'(missing {missing})')
            rows = [{'coord_y': int(r['coord_y']), 'coord_x': int(r['coord_x']),
                     'tumor_patch': _flag(r['tumor_patch']), 'center_tumor_patch': _flag(r['center_tumor_patch']),
                     'wsi': r['wsi']} for r in reader]
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        if isinstance(e, PCamFormatError):
            raise
        raise PCamFormatError(f'{path}: unreadable row ({e}); expected integer coordinates and True/False '
                              f'flags') from e
    if n is not None and len(rows) != n:
        raise PCamFormatError(f'{path}: {len(rows)} rows; expected {n} (one per image)')
    return rows


def _flag(value: str) -> bool:
    if value not in ('True', 'False'):
        raise ValueError(f"flag {value!r}, expected 'True' or 'False'")
    return value == 'True'


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
        self.meta = read_meta_rows(self.meta_path, self._n) if with_meta else None
        self.provenance = split_provenance(self.root, self.split)  # 'synthetic', 'pcam' or 'unknown'
        self._file: h5py.File | None = None
        self._ds: h5py.Dataset | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self._n

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state['_file'] = state['_ds'] = None  # handles never cross a process boundary
        state['_pid'] = None
        return state

    def _images_ds(self) -> h5py.Dataset | np.ndarray:
        if self._images is not None:
            return self._images
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.x_path, 'r')
            self._pid = os.getpid()
            self._ds = self._file['x']  # looking the dataset up costs more than reading a patch: keep it
        return self._ds

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
            bounds = np.concatenate(([0], breaks, [idx.size])).tolist()
            first = sorted_idx.tolist()
            positions = order.tolist()
            for s, e in zip(bounds[:-1], bounds[1:]):
                a = first[s]
                if e - s == 1:
                    out[positions[s]] = images[a]
                elif positions[e - 1] - positions[s] == e - s - 1:  # also in order in the output: read in place
                    images.read_direct(out, np.s_[a:a + e - s], np.s_[positions[s]:positions[e - 1] + 1])
                else:
                    out[order[s:e]] = images[a:a + e - s]
        return out, self.labels[idx]

    def _sample(self, image: np.ndarray, label: int, index: int) -> tuple[Any, ...]:
        item = self.transform(image) if self.transform is not None else image
        if self.with_meta:
            return item, label, self.meta[index]  # type: ignore[index]
        return item, label

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        i = int(index)
        if not -self._n <= i < self._n:
            raise IndexError(f'{self.x_path}: index {index} out of range for {self._n} patches')
        i %= self._n
        return self._sample(self._images_ds()[i], int(self.labels[i]), i)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, ...]]:
        images, labels = self.read_batch(indices)
        return [self._sample(img, int(lab), int(i)) for img, lab, i in zip(images, labels, indices)]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._ds = None

