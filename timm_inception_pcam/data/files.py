"""The official PCam file layout: names, split aliases, expected shapes, and the error raised on bad files."""
from pathlib import Path

from ..constants import SPLITS
from ..errors import DataError, UsageError

__all__ = ['PCamFormatError', 'ChecksumError', 'SPLIT_FILE_KEYS', 'META_COLUMNS', 'IMAGE_SHAPE', 'normalize_split',
           'split_file', 'split_paths']

SPLIT_FILE_KEYS: tuple[str, str, str] = ('x', 'y', 'meta')
META_COLUMNS: tuple[str, ...] = ('coord_y', 'coord_x', 'tumor_patch', 'center_tumor_patch', 'wsi')
IMAGE_SHAPE: tuple[int, int, int] = (96, 96, 3)
_ALIASES = {'train': 'train', 'training': 'train', 'valid': 'valid', 'val': 'valid', 'validation': 'valid',
            'test': 'test'}


class PCamFormatError(DataError):
    """A PCam file exists but does not hold what the official layout promises."""


class ChecksumError(DataError):
    """A file's checksum differs from the expected one (corrupt, truncated or not the official file)."""


def normalize_split(split: str) -> str:
    """'train' | 'valid' | 'test'; also accepts 'val', 'validation' and 'training'."""
    try:
        return _ALIASES[str(split).lower()]
    except KeyError:
        raise UsageError(f"unknown PCam split {split!r}: expected one of {', '.join(SPLITS)} "
                         f"(or 'val' / 'validation')") from None


def split_file(split: str, key: str) -> str:
    """Official file name of one split's images ('x'), labels ('y') or metadata ('meta'), uncompressed."""
    split = normalize_split(split)
    if key == 'meta':
        return f'camelyonpatch_level_2_split_{split}_meta.csv'
    if key not in ('x', 'y'):
        raise UsageError(f"unknown PCam file key {key!r}: expected 'x', 'y' or 'meta'")
    return f'camelyonpatch_level_2_split_{split}_{key}.h5'


def split_paths(root: str | Path, split: str) -> dict[str, Path]:
    root = Path(root)
    return {key: root / split_file(split, key) for key in SPLIT_FILE_KEYS}
