"""PCam data: the official files, the synthetic sample in their exact layout, and PCam-safe transforms."""
from .files import META_COLUMNS, PCamFormatError, normalize_split, split_file, split_paths
from .pcam import PCamDataset, check_split_files, ensure_decompressed
from .synth import render_patches, synthesize_pcam
from .transforms import PcamTransform, create_pcam_transform, dihedral, stain_jitter

__all__ = [
    'META_COLUMNS', 'PCamDataset', 'PCamFormatError', 'PcamTransform', 'check_split_files', 'create_pcam_transform',
    'dihedral', 'ensure_decompressed', 'normalize_split', 'render_patches', 'split_file', 'split_paths',
    'stain_jitter', 'synthesize_pcam',
]
