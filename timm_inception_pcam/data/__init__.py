"""PCam data: the official files, the synthetic sample in their exact layout, and PCam-safe transforms."""
from .convert import convert_pcam
from .download import download_file, download_pcam
from .files import META_COLUMNS, ChecksumError, PCamFormatError, normalize_split, split_file, split_paths
from .pcam import PCamDataset, check_split_files, ensure_decompressed, read_meta_rows
from .provenance import PCAM, SYNTHETIC, UNKNOWN, folder_provenance, split_provenance
from .synth import render_patches, synthesize_pcam
from .transforms import PcamTransform, create_pcam_transform, dihedral, stain_jitter

__all__ = [
    'PCAM', 'SYNTHETIC', 'UNKNOWN', 'folder_provenance', 'split_provenance',
    'META_COLUMNS', 'ChecksumError', 'PCamDataset', 'PCamFormatError', 'PcamTransform', 'check_split_files',
    'convert_pcam', 'create_pcam_transform', 'dihedral', 'download_file', 'download_pcam', 'ensure_decompressed',
    'normalize_split', 'read_meta_rows', 'render_patches', 'split_file', 'split_paths', 'stain_jitter',
    'synthesize_pcam',
]
