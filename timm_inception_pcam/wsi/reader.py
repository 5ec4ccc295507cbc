"""Reading whole slides with OpenSlide: regions as RGB uint8, failures as `SlideError`s naming the file."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError

__all__ = ['SlideError', 'WholeSlide', 'open_slide']

_THUMB_READ_PX = 1 << 23  # level pixels read at once while building the thumbnail


class SlideError(DataError):
    """A slide that cannot be used (missing, corrupt, unsupported, no resolution) or a run that cannot resume."""


class WholeSlide:
    """An OpenSlide handle whose failures become `SlideError`s naming the file; regions come back as RGB uint8."""

    def __init__(self, path: str | os.PathLike):
        try:
            import openslide
        except ImportError as e:  # openslide-python without the library, or neither installed
            raise SlideError(f'reading whole slides needs OpenSlide: pip install openslide-bin openslide-python '
                             f'({e})') from e
        self._openslide = openslide
        self.path = Path(path)
        if self.path.is_dir():
            raise SlideError(f'{self.path}: a folder, expected a slide file (.svs, .tif, .ndpi, ...)')
        if not self.path.is_file():
            raise SlideError(f'{self.path}: slide file not found')
        try:
            vendor = openslide.OpenSlide.detect_format(str(self.path))
        except openslide.OpenSlideError as e:
            raise SlideError(f'{self.path}: unreadable slide ({e})') from e
        if vendor is None:
            raise SlideError(f'{self.path}: unsupported file (or a damaged/truncated one): expected a whole-slide '
                             f'image OpenSlide can read (tiled/pyramidal TIFF, SVS, NDPI, MRXS, SCN, Philips TIFF, '
                             f'DICOM, ...)')
        try:
            self.handle = openslide.OpenSlide(str(self.path))
            self.level_dimensions: tuple[tuple[int, int], ...] = tuple(self.handle.level_dimensions)
            self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in self.handle.level_downsamples)
            self.properties: dict[str, str] = dict(self.handle.properties)
        except openslide.OpenSlideError as e:
            raise SlideError(f'{self.path}: corrupt or unsupported {vendor} slide: OpenSlide says "{e}"') from e
        self.vendor = vendor
        background = self.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, 'FFFFFF')
        try:
            self.background = np.array([int(background[i:i + 2], 16) for i in (0, 2, 4)], dtype=np.float32)
        except ValueError:
            self.background = np.full(3, 255, dtype=np.float32)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def mpp(self, override: float | None = None) -> tuple[float, str]:
        """Level-0 um/px (mean of x and y) and where it came from ('--mpp' or 'metadata')."""
        if override is not None:
            return float(override), '--mpp'
        values = []
        for key in (self._openslide.PROPERTY_NAME_MPP_X, self._openslide.PROPERTY_NAME_MPP_Y):
            raw = self.properties.get(key)
            try:
                value = float(raw) if raw is not None else math.nan
            except ValueError:
                value = math.nan
            if math.isfinite(value) and value > 0:
                values.append(value)
        if not values:
            raise SlideError(f'{self.path}: no physical resolution in the slide metadata (openslide.mpp-x/-y missing '
                             f'or invalid): pass --mpp with the level-0 resolution in um/px (e.g. 0.25 for 40x)')
        return float(np.mean(values)), 'metadata'

    def read_rgb(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 region of `level` whose top-left is level pixel (x, y); outside the slide is background."""
        ds = self.level_downsamples[level]
        try:
            region = self.handle.read_region((round(x * ds), round(y * ds)), level, (w, h))
        except self._openslide.OpenSlideError as e:
            raise SlideError(f'{self.path}: cannot read level {level} region x={x} y={y} {w}x{h}: the slide is '
                             f'corrupt or truncated (OpenSlide says "{e}")') from e
        rgba = np.asarray(region)
        if rgba[..., 3].min() == 255:
            return np.ascontiguousarray(rgba[..., :3])
        alpha = rgba[..., 3:].astype(np.float32) / 255.0  # not premultiplied: composite onto the background
        return np.rint(rgba[..., :3] * alpha + self.background * (1.0 - alpha)).astype(np.uint8)

    def thumbnail(self, max_side: int) -> np.ndarray:
        """RGB thumbnail whose longer side is at most `max_side`, built strip by strip (bounded memory)."""
        w0, h0 = self.dimensions
        scale = min(1.0, max_side / max(w0, h0))
        tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        level = self.handle.get_best_level_for_downsample(1.0 / scale)
        lw, lh = self.level_dimensions[level]
        out = np.empty((th, tw, 3), dtype=np.uint8)
        rows_per_thumb_row = lh / th
        step = max(1, int(_THUMB_READ_PX / (lw * (rows_per_thumb_row + 2))))
        for ty0 in range(0, th, step):
            ty1 = min(th, ty0 + step)
            ly0, ly1 = ty0 * rows_per_thumb_row, ty1 * rows_per_thumb_row
            iy0, iy1 = math.floor(ly0), min(lh, math.ceil(ly1))
            strip = Image.fromarray(self.read_rgb(level, 0, iy0, lw, max(1, iy1 - iy0)))
            out[ty0:ty1] = np.asarray(strip.resize((tw, ty1 - ty0), Image.Resampling.BOX,
                                                   box=(0, ly0 - iy0, lw, min(ly1, iy1) - iy0)))
        return out

    def close(self) -> None:
        self.handle.close()


def open_slide(path: str | os.PathLike) -> WholeSlide:
    return WholeSlide(path)
