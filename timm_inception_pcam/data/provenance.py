"""Where a PCam-layout folder came from: `synthetic` (written by `synth`), `pcam` (the official files, md5-verified)
or `unknown` (not verified yet: `python -m timm_inception_pcam.data info --verify` checks the md5s once).

Synthetic files carry an HDF5 attribute on their root group; official files are recognised by their md5, which
`download`, `decompress` and `info --verify` record in `.pcam_verified.json` beside them (keyed by size and mtime, so
a later change of the file voids it). Checkpoints, reports, benchmark results and slide summaries record the answer,
and the Hub folder never presents a result on synthetic data as a PCam result.
"""
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py

from ..storage import atomic_write_json
from .download import GZ_MD5, H5_MD5, file_md5
from .files import normalize_split, split_paths

__all__ = ['SYNTHETIC', 'PCAM', 'UNKNOWN', 'PROVENANCES', 'PROVENANCE_ATTR', 'SYNTH_INFO', 'VERIFIED_RECORD',
           'provenance_of', 'mark_synthetic', 'file_provenance', 'split_provenance', 'folder_provenance',
           'record_verified', 'verify_official']

SYNTHETIC, PCAM, UNKNOWN = 'synthetic', 'pcam', 'unknown'
PROVENANCES = (PCAM, SYNTHETIC, UNKNOWN)
PROVENANCE_ATTR = 'timm_inception_pcam_provenance'
SYNTH_INFO = 'synthetic_pcam.json'
VERIFIED_RECORD = '.pcam_verified.json'


def mark_synthetic(h5_file: h5py.File, **details: Any) -> None:
    """Mark an HDF5 file being written as synthetic (root attributes: provenance and generator details)."""
    h5_file.attrs[PROVENANCE_ATTR] = SYNTHETIC
    for key, value in details.items():
        h5_file.attrs[f'{PROVENANCE_ATTR}_{key}'] = value


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {'size': st.st_size, 'mtime_ns': st.st_mtime_ns}


def _read_record(folder: Path) -> dict[str, Any]:
    try:
        record = json.loads((folder / VERIFIED_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def record_verified(path: str | Path, md5: str) -> None:
    """Remember that `path` (an official file name) had `md5`, valid while its size and mtime stay the same."""
    path = Path(path)
    record = _read_record(path.parent)
    record[path.name] = {'md5': md5.lower(), **_stat_key(path)}
    atomic_write_json(path.parent / VERIFIED_RECORD, record)


def _official_md5(name: str) -> str | None:
    return H5_MD5.get(name) or GZ_MD5.get(name)


def file_provenance(path: str | Path) -> str:
    """`synthetic`, `pcam` or `unknown` for one .h5 file (cheap: reads an attribute and the verification record)."""
    path = Path(path)
    try:
        with h5py.File(path, 'r') as f:
            if f.attrs.get(PROVENANCE_ATTR) == SYNTHETIC:
                return SYNTHETIC
    except OSError:
        return UNKNOWN
    seen = _read_record(path.parent).get(path.name)
    if isinstance(seen, dict) and seen.get('md5') == _official_md5(path.name) and seen is not None \
            and {k: seen.get(k) for k in ('size', 'mtime_ns')} == _stat_key(path):
        return PCAM
    return UNKNOWN


def verify_official(path: str | Path, progress: bool = True) -> str:
    """Compute the md5 of an unmarked file and record it when it is the official one; returns its provenance."""
    path = Path(path)
    found = file_provenance(path)
    if found != UNKNOWN:
        return found
    expected = _official_md5(path.name)
    if expected is not None and file_md5(path, progress=progress) == expected:
        record_verified(path, expected)
        return PCAM
    return UNKNOWN


def _combine(values: list[str]) -> str:
    if SYNTHETIC in values:
        return SYNTHETIC
    return PCAM if values and all(v == PCAM for v in values) else UNKNOWN


def split_provenance(root: str | Path, split: str) -> str:
    """Provenance of one split: its image and label files together (synthetic wins; pcam only if both are)."""
    paths = split_paths(root, normalize_split(split))
    return _combine([file_provenance(paths[k]) for k in ('x', 'y')])


def folder_provenance(root: str | Path, splits: tuple[str, ...] = ('train', 'valid', 'test')) -> dict[str, Any]:
    """`{'provenance': ..., 'splits': {split: ...}}` for the splits present under `root` (what records store)."""
    present = [s for s in splits if split_paths(root, s)['x'].is_file()]
    per_split = {s: split_provenance(root, s) for s in present}
    return {'provenance': _combine(list(per_split.values())), 'splits': per_split}


def provenance_of(value: Any) -> str:
    """'pcam' | 'synthetic' | 'unknown' from a recorded provenance (a string, a JSON string or a mapping)."""
    if isinstance(value, str) and value.strip().startswith('{'):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return UNKNOWN
    if isinstance(value, Mapping):
        value = value.get('provenance', value.get('kind'))
    value = value.strip().lower() if isinstance(value, str) else None
    return value if value in PROVENANCES else UNKNOWN
