"""Where tiles are: the pyramid level and resampling for PCam's resolution, the tile grid, and the tissue mask."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .options import PCAM_MPP, TILE, SlideOptions
from .reader import SlideError, WholeSlide

__all__ = ['TileGrid', 'choose_level', 'plan_grid', 'read_row', 'tissue_fractions', 'MAX_GRID_BYTES']

_READ_PX = 8192  # widest read, in level pixels: bounds the memory of one chunk (8192 x 96 x resample^2 x 4 bytes)
# Memory a run may plan for its per-tile maps (probability and tissue, float32, plus working copies when the
# outputs are written) and one grid row of pixels; a grid needing more is refused before anything is allocated.
MAX_GRID_BYTES = 4 << 30
MAX_UPSAMPLE = 4.0  # tile px per finest-level px: beyond it the detail the model reads is not in the slide
_BYTES_PER_CELL = 16


def choose_level(level_mpps: Sequence[float], target_mpp: float = PCAM_MPP, tolerance: float = 0.1
                 ) -> tuple[int, float]:
    """(level, resample): the level to read and how many of its pixels make one tile pixel.

    The level closest to `target_mpp` (in ratio) is used as is when within `tolerance`; otherwise the coarsest
    level finer than the target is downsampled to it, or, when every level is coarser, the finest is upsampled.
    """
    if not level_mpps:
        raise SlideError('choose_level: the slide has no pyramid levels')
    ratios = [target_mpp / m for m in level_mpps]  # level px per target px; > 1 means finer than the target
    closest = min(range(len(ratios)), key=lambda i: abs(math.log(ratios[i])))
    if abs(math.log(ratios[closest])) <= math.log1p(tolerance):
        return closest, 1.0
    finer = [i for i, r in enumerate(ratios) if r > 1]
    level = min(finer, key=lambda i: ratios[i]) if finer else max(range(len(ratios)), key=lambda i: ratios[i])
    return level, ratios[level]


@dataclass(frozen=True)
class TileGrid:
    """Tiles of `tile` px at `stride` over a level read at `resample` level px per tile px."""

    level: int
    level_size: tuple[int, int]
    level_downsample: float  # level-0 px per level px
    resample: float  # level px per tile px (1.0: the level as stored)
    mpp0: float  # level-0 um/px
    tile: int
    stride: int
    rows: int
    cols: int

    @property
    def scale0(self) -> float:
        """Level-0 px per tile px."""
        return self.level_downsample * self.resample

    @property
    def tile_mpp(self) -> float:
        return self.mpp0 * self.scale0

    @property
    def row_width(self) -> int:
        """Tile px spanned by one grid row."""
        return (self.cols - 1) * self.stride + self.tile

    def box0(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Level-0 top-left (x, y) of tiles and their level-0 side."""
        return cols * self.stride * self.scale0, rows * self.stride * self.scale0, self.tile * self.scale0

    def chunk_cols(self) -> int:
        """Tiles per read so that one read spans at most _READ_PX level pixels."""
        span = _READ_PX / self.resample
        return max(1, int((span - self.tile) // self.stride) + 1)

    def planned_bytes(self) -> int:
        """Memory the per-tile maps and one row strip take."""
        return self.rows * self.cols * _BYTES_PER_CELL + self.tile * self.row_width * 3


def _grid_count(size: float, tile: int, stride: int) -> int:
    return 1 if size <= tile else math.ceil((size - tile) / stride) + 1


def _check_size(grid: TileGrid, mpp_source: str, path: object) -> None:
    """Refuse a grid upsampled beyond MAX_UPSAMPLE or whose reads or maps would be absurdly large (a wrong --mpp or
    slide resolution, a tiny stride)."""
    why = (f'level-0 resolution {grid.mpp0:g} um/px from {mpp_source}, tiles at {grid.tile_mpp:g} um/px, '
           f'stride {grid.stride}')
    if grid.resample < 1 / MAX_UPSAMPLE:
        raise SlideError(f'{path}: the finest level, {grid.mpp0 * grid.level_downsample:g} um/px, is over '
                         f'{MAX_UPSAMPLE:g}x coarser than the tiles ({why}): upsampling would invent the detail the '
                         f'model reads; expected a slide scanned near {PCAM_MPP} um/px or finer: check --mpp / '
                         f'--target-mpp')
    if grid.tile * grid.resample > _READ_PX:
        raise SlideError(f'{path}: one {grid.tile}-px tile would need a {grid.tile * grid.resample:.3g}-px square '
                         f'read of level {grid.level} ({why}); expected a resolution near {PCAM_MPP} um/px within '
                         f'{_READ_PX // grid.tile}x of a pyramid level: check --mpp / --target-mpp')
    need = grid.planned_bytes()
    if need > MAX_GRID_BYTES:
        raise SlideError(f'{path}: a {grid.rows} x {grid.cols} tile grid would need {need / 2**30:.3g} GiB ({why}); '
                         f'expected at most {MAX_GRID_BYTES / 2**30:g} GiB: check --mpp / --target-mpp or raise '
                         f'--stride')


def plan_grid(slide: WholeSlide, options: SlideOptions) -> tuple[TileGrid, str]:
    """The tile grid for a slide under `options`, and where the level-0 resolution came from.

    Raises SlideError, before anything is allocated, when the grid or its reads would be absurdly large.
    """
    mpp0, source = slide.mpp(options.mpp)
    level_mpps = [mpp0 * d for d in slide.level_downsamples]
    level, resample = choose_level(level_mpps, options.target_mpp, options.mpp_tolerance)
    lw, lh = slide.level_dimensions[level]
    grid = TileGrid(level=level, level_size=(lw, lh), level_downsample=slide.level_downsamples[level],
                    resample=resample, mpp0=mpp0, tile=TILE, stride=options.stride,
                    rows=_grid_count(lh / resample, TILE, options.stride),
                    cols=_grid_count(lw / resample, TILE, options.stride))
    _check_size(grid, source, slide.path)
    return grid, source


def read_row(slide: WholeSlide, grid: TileGrid, row: int) -> np.ndarray:
    """(tile, row_width, 3) uint8 strip of grid row `row` at the tile resolution, read in bounded chunks."""
    strip = np.empty((grid.tile, grid.row_width, 3), dtype=np.uint8)
    y_t = row * grid.stride
    step = grid.chunk_cols()
    for c0 in range(0, grid.cols, step):
        c1 = min(grid.cols, c0 + step)
        x_t, w_t = c0 * grid.stride, (c1 - 1 - c0) * grid.stride + grid.tile
        if grid.resample == 1.0:
            strip[:, x_t:x_t + w_t] = slide.read_rgb(grid.level, x_t, y_t, w_t, grid.tile)
            continue
        lx, ly = x_t * grid.resample, y_t * grid.resample
        lw, lh = w_t * grid.resample, grid.tile * grid.resample
        ix, iy = math.floor(lx), math.floor(ly)
        region = slide.read_rgb(grid.level, ix, iy, math.ceil(lx + lw) - ix, math.ceil(ly + lh) - iy)
        method = Image.Resampling.BOX if grid.resample > 1 else Image.Resampling.BILINEAR
        strip[:, x_t:x_t + w_t] = np.asarray(Image.fromarray(region).resize(
            (w_t, grid.tile), method, box=(lx - ix, ly - iy, lx - ix + lw, ly - iy + lh)))
    return strip


def tissue_fractions(strip: np.ndarray, grid: TileGrid, saturation: float) -> np.ndarray:
    """Fraction of pixels with HSV saturation >= `saturation` in every tile of a row strip."""
    mx = strip.max(axis=2).astype(np.float32)
    mn = strip.min(axis=2).astype(np.float32)
    tissue = (mx - mn >= saturation * mx) & (mx > 0)
    cum = np.concatenate([[0], np.cumsum(tissue.sum(axis=0, dtype=np.int64))])
    x = np.arange(grid.cols) * grid.stride
    return ((cum[x + grid.tile] - cum[x]) / float(grid.tile * grid.tile)).astype(np.float32)
