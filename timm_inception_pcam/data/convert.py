"""Convert the official HDF5 files into what timm's train.py reads: an ImageFolder tree or webdataset shards.

Folder: `OUT/{train,validation,test}/{0_normal,1_metastatic}/{split}_{index:06d}.png` (lossless PNG: JPEG would
alter the stain texture; the numeric prefixes make ImageFolder's sorted class order give normal = 0).
Webdataset: `OUT/pcam-{split}-{shard:05d}.tar` with `__key__`, `png`, `cls` (ASCII label) and `json` (the meta row
when present), plus `OUT/_info.json` in the form timm's `wds/` reader expects (`--dataset wds/pcam`).

Every PNG and shard is written under a temporary name and renamed when complete, so a rerun after an interruption
skips what is done (resumable). `OUT/.pcam_convert.json` records the source fingerprint from the start (a rerun
into a folder made from different data is refused) and gets `"complete": true` and the counts only after they have
been verified against the HDF5 labels.
"""
import hashlib
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..constants import LABEL_NAMES
from ..errors import OutputExistsError, UsageError
from ..storage import LOCK_NAME, atomic_path, atomic_write_json, claim_output_dir
from .files import PCamFormatError, normalize_split, split_paths
from .pcam import PCamDataset, check_split_files, read_meta_rows

__all__ = ['MARKER', 'FORMATS', 'FOLDER_SPLITS', 'CLASS_DIRS', 'convert_pcam', 'source_fingerprint']

MARKER = '.pcam_convert.json'
MARKER_FORMAT = 'timm-inception-pcam-convert/1'
FORMATS = ('folder', 'wds')
FOLDER_SPLITS = {'train': 'train', 'valid': 'validation', 'test': 'test'}  # timm's default split names
CLASS_DIRS = tuple(f'{i}_{name}' for i, name in enumerate(LABEL_NAMES))
_PNG_LEVEL = 1  # zlib level: lossless at any level, 1 is the fastest


def source_fingerprint(root: Path, split: str) -> dict[str, Any]:
    """Cheap identity of one split: count, label digest, first and last image digests, file sizes."""
    paths = split_paths(root, split)
    n, labels = check_split_files(paths['x'], paths['y'])
    ds = PCamDataset(root, split)
    ends, _ = ds.read_batch([0, n - 1]) if n else (np.zeros((0,)), None)
    ds.close()
    return {'n': n, 'positives': int(labels.sum()), 'labels_sha256': hashlib.sha256(labels.tobytes()).hexdigest(),
            'ends_sha256': hashlib.sha256(np.ascontiguousarray(ends).tobytes()).hexdigest(),
            'x_bytes': paths['x'].stat().st_size}


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format='PNG', compress_level=_PNG_LEVEL)
    return buf.getvalue()


_WORKER_DATA: dict[tuple[str, str], PCamDataset] = {}


def _dataset(root: str, split: str) -> PCamDataset:
    key = (root, split)
    if key not in _WORKER_DATA:  # one lazily opened reader per worker process and split
        _WORKER_DATA[key] = PCamDataset(root, split)
    return _WORKER_DATA[key]


def _folder_job(root: str, split: str, start: int, stop: int, out: str) -> int:
    """Write the PNGs of [start, stop) that are not there yet; returns how many were written."""
    ds = _dataset(root, split)
    out_dir = Path(out) / FOLDER_SPLITS[split]
    todo = [i for i in range(start, stop)
            if not (out_dir / CLASS_DIRS[ds.labels[i]] / f'{split}_{i:06d}.png').is_file()]
    if not todo:
        return 0
    images, labels = ds.read_batch(np.arange(todo[0], todo[-1] + 1))
    for i in todo:
        k = i - todo[0]
        with atomic_path(out_dir / CLASS_DIRS[labels[k]] / f'{split}_{i:06d}.png') as tmp:
            tmp.write_bytes(_png_bytes(images[k]))
    return len(todo)


def _shard_name(split: str, shard: int) -> str:
    return f'pcam-{FOLDER_SPLITS[split]}-{shard:05d}.tar'


def _wds_job(root: str, split: str, start: int, stop: int, out: str, shard: int) -> int:
    """Write one tar shard holding patches [start, stop); returns how many were written (0 if it existed)."""
    path = Path(out) / _shard_name(split, shard)
    if path.is_file():
        return 0
    ds = _dataset(root, split)
    meta_path = split_paths(root, split)['meta']
    meta = read_meta_rows(meta_path, len(ds)) if meta_path.is_file() else None
    images, labels = ds.read_batch(np.arange(start, stop))
    with atomic_path(path) as tmp, tarfile.open(tmp, 'w', format=tarfile.USTAR_FORMAT) as tar:
        for k, i in enumerate(range(start, stop)):
            key = f'{split}_{i:06d}'
            members = {'png': _png_bytes(images[k]), 'cls': str(int(labels[k])).encode()}
            if meta is not None:
                members['json'] = json.dumps(meta[i]).encode()
            for ext, data in members.items():
                info = tarfile.TarInfo(f'{key}.{ext}')
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
    return stop - start


def _verify_folder(out: Path, split: str, labels: np.ndarray) -> dict[str, int]:
    counts = {}
    for c, name in enumerate(CLASS_DIRS):
        found = sum(1 for p in (out / FOLDER_SPLITS[split] / name).glob('[!.]*.png'))  # temporary files start with '.'
        expected = int((labels == c).sum())
        if found != expected:
            raise PCamFormatError(f'{out / FOLDER_SPLITS[split] / name}: {found} PNG files after conversion, expected '
                                  f'{expected} ({split} patches labelled {c}); remove the folder and convert again')
        counts[name] = found
    return counts


def _verify_shards(out: Path, split: str, lengths: list[int]) -> None:
    for shard, expected in enumerate(lengths):
        path = out / _shard_name(split, shard)
        try:
            with tarfile.open(path) as tar:
                found = sum(1 for m in tar.getmembers() if m.name.endswith('.png'))
        except (OSError, tarfile.TarError) as e:
            raise PCamFormatError(f'{path}: unreadable shard ({e}); delete it and convert again') from e
        if found != expected:
            raise PCamFormatError(f'{path}: {found} images, expected {expected}; delete it and convert again')


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: the worker ends once the process that started it is gone (killed with -9), instead of
    waiting for chunks forever."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name='exit-with-parent', daemon=True).start()


def _check_marker(out: Path, fmt: str, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    marker = out / MARKER
    if not marker.is_file():
        if out.is_dir() and any(p.name not in (MARKER, LOCK_NAME) for p in out.iterdir()):
            raise OutputExistsError(f'{out}: not empty and has no {MARKER}; expected an empty folder or one that an '
                                  f'earlier `convert` of the same data wrote (to resume)')
        return None
    try:
        found = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise PCamFormatError(f'{marker}: unreadable conversion record ({e})') from e
    if found.get('format') != fmt or found.get('source') != fingerprint:
        source = found.get('source') if isinstance(found.get('source'), dict) else {}
        differs = sorted(s for s in {*source, *fingerprint} if source.get(s) != fingerprint.get(s))
        raise OutputExistsError(f'{out}: already holds a different conversion ({found.get("format")!r} of splits '
                                f'{", ".join(sorted(source)) or "none"}; this one: {fmt!r} of '
                                f'{", ".join(fingerprint)}; the source files differ in {", ".join(differs) or "none"}'
                                f'). Choose another --output or delete it')
    return found


def convert_pcam(root: str | os.PathLike, out: str | os.PathLike, fmt: str = 'folder',
                 splits: Iterable[str] = ('train', 'valid', 'test'), workers: int = 2, chunk: int = 1024,
                 shard_size: int = 4096, progress: bool = True) -> dict[str, Any]:
    """Convert `splits` of the PCam files in `root` to `out` (format 'folder' or 'wds'); returns the record."""
    if fmt not in FORMATS:
        raise UsageError(f'unknown convert format {fmt!r}: expected one of {FORMATS}')
    root, out = Path(root), Path(out)
    splits = list(dict.fromkeys(normalize_split(s) for s in splits))
    fingerprint = {s: source_fingerprint(root, s) for s in splits}
    found = _check_marker(out, fmt, fingerprint)
    if found is not None and found.get('complete'):
        return {**found, 'written_now': 0}  # done by an earlier run: nothing written now
    with claim_output_dir(out):  # one conversion at a time: two would race on the files and the record
        found = _check_marker(out, fmt, fingerprint)  # another run may have finished it while this one waited
        if found is not None and found.get('complete'):
            return {**found, 'written_now': 0}
        return _convert(root, out, fmt, splits, fingerprint, workers, chunk, shard_size, progress)


def _convert(root: Path, out: Path, fmt: str, splits: list[str], fingerprint: dict[str, Any], workers: int,
             chunk: int, shard_size: int, progress: bool) -> dict[str, Any]:
    """`convert_pcam` in its claimed folder: the jobs, the checks, then the record marked complete."""
    record: dict[str, Any] = {'format': fmt, 'marker_format': MARKER_FORMAT, 'source': fingerprint,
                              'complete': False}
    atomic_write_json(out / MARKER, record)

    jobs: list[tuple[Any, ...]] = []
    shard_lengths: dict[str, list[int]] = {}
    for split in splits:
        n = fingerprint[split]['n']
        if fmt == 'folder':
            jobs += [(_folder_job, str(root), split, a, min(a + chunk, n), str(out)) for a in range(0, n, chunk)]
        else:
            starts = list(range(0, n, shard_size))
            shard_lengths[split] = [min(a + shard_size, n) - a for a in starts]
            jobs += [(_wds_job, str(root), split, a, min(a + shard_size, n), str(out), k) for k, a in enumerate(starts)]
    total = sum(fingerprint[s]['n'] for s in splits)
    written = 0
    with tqdm(total=total, unit='patch', desc=f'convert -> {fmt}', disable=not progress) as bar:
        if workers > 1 and len(jobs) > 1:
            pool = ProcessPoolExecutor(max_workers=workers, initializer=_exit_with_parent, initargs=(os.getpid(),))
            try:
                futures = [(pool.submit(job[0], *job[1:]), job) for job in jobs]
                for future, job in futures:
                    written += future.result()
                    bar.update(job[4] - job[3])
            finally:  # Ctrl-C or a failed chunk: the chunks being written finish, the others never start
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            for job in jobs:
                written += job[0](*job[1:])
                bar.update(job[4] - job[3])
    _WORKER_DATA.clear()

    counts: dict[str, Any] = {}
    for split in splits:
        labels = check_split_files(*(split_paths(root, split)[k] for k in ('x', 'y')))[1]
        if fmt == 'folder':
            counts[FOLDER_SPLITS[split]] = _verify_folder(out, split, labels)
        else:
            _verify_shards(out, split, shard_lengths[split])
            counts[FOLDER_SPLITS[split]] = {name: int((labels == c).sum()) for c, name in enumerate(CLASS_DIRS)}
    if fmt == 'wds':
        info = {'name': 'pcam', 'splits': {
            FOLDER_SPLITS[s]: {'name': FOLDER_SPLITS[s], 'num_samples': fingerprint[s]['n'],
                               'filenames': [_shard_name(s, k) for k in range(len(shard_lengths[s]))],
                               'shard_lengths': shard_lengths[s]} for s in splits}}
        atomic_write_json(out / '_info.json', info)
    record.update(complete=True, counts=counts, written_now=written, class_dirs=list(CLASS_DIRS))
    atomic_write_json(out / MARKER, record)
    return record
