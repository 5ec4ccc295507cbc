"""The settings of a whole-slide run, range-checked before anything is read or allocated."""
from __future__ import annotations

from dataclasses import dataclass

from ..constants import PCAM_INPUT_SIZE
from ..errors import check_range

__all__ = ['PCAM_MPP', 'TILE', 'SlideOptions']

PCAM_MPP = 0.972  # um/px of PCam patches: level 2 of Camelyon16's 0.243 um/px scans
TILE = PCAM_INPUT_SIZE[1]
# Plausible resolutions in um/px: a 100x oil objective is ~0.05, a slide overview camera ~50. Outside: a typo.
MPP_RANGE = (1e-3, 1e3)
MAX_BATCH = 8192  # patches held at once: 8192 x 27 KiB = 216 MiB
MAX_THUMBNAIL = 16384  # px on the heatmap background's longer side


@dataclass(frozen=True)
class SlideOptions:
    target_mpp: float = PCAM_MPP
    mpp: float | None = None  # level-0 um/px overriding the slide's metadata
    mpp_tolerance: float = 0.1  # a level within this relative distance of target_mpp is used without resampling
    stride: int = TILE
    batch_size: int = 64
    tissue_threshold: float = 0.07
    min_tissue: float = 0.25
    threshold: float = 0.5
    save_every: float = 30.0  # seconds between progress saves
    thumbnail_size: int = 2048

    def check(self) -> SlideOptions:
        """Raise UsageError naming the first option out of range; return self."""
        check_range('--target-mpp', self.target_mpp, *MPP_RANGE)
        check_range('--mpp', self.mpp, *MPP_RANGE)
        check_range('--mpp-tolerance', self.mpp_tolerance, 0.0, 10.0)
        check_range('--stride', self.stride, 1, 16 * TILE)
        check_range('--batch-size', self.batch_size, 1, MAX_BATCH)
        for name in ('tissue_threshold', 'min_tissue', 'threshold'):
            check_range(f'--{name.replace("_", "-")}', getattr(self, name), 0.0, 1.0)
        check_range('--save-every', self.save_every, 0.0)
        check_range('--thumbnail-size', self.thumbnail_size, 16, MAX_THUMBNAIL)
        return self
