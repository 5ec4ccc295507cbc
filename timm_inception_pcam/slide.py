"""Whole-slide inference: a metastasis probability map (heatmap) of a lymph-node slide.

    python -m timm_inception_pcam.slide SLIDE.tif --model inception_v4_pcam --checkpoint model_best.pth \\
        --out runs/slide/SLIDE [--backend auto|eager|onnxruntime|tensorrt] [--stride 96] [--resume]

The slide is read with OpenSlide (pyramidal/tiled TIFF, SVS, NDPI, MRXS, ...) at the pyramid level closest to
PCam's ~0.972 um/px (Camelyon16's 0.243 um/px scans undersampled 4x), resampled when no level is within
`--mpp-tolerance`. 96-px tiles on a `--stride` grid are kept when at least `--min-tissue` of their pixels have HSV
saturation >= `--tissue-threshold` (0.07, the threshold PCam's authors used to drop background); background tiles
are never classified. Tiles are read one grid row at a time (in bounded chunks, the next row prefetched while the
model runs) and streamed through the predictor in batches, so memory does not grow with the slide.

Outputs in `--out`: `probability.npy` (float32 rows x cols, NaN where not classified), `heatmap.png` (the map over
the slide thumbnail), `tiles.csv` / `tiles.geojson` (tiles with probability >= `--threshold`, level-0 pixel
coordinates), `summary.json` (written last) and `progress.npz` (the state `--resume` continues from; saved
atomically every `--save-every` seconds and when interrupted).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from .constants import LABEL_NAMES, PCAM_INPUT_SIZE, PCAM_NUM_CLASSES
from .errors import DataError
from .storage import atomic_path, atomic_write_bytes, atomic_write_json, file_sha256

__all__ = ['SlideError', 'SlideOptions', 'TileGrid', 'WholeSlide', 'open_slide', 'choose_level', 'plan_grid',
           'tissue_fractions', 'run_slide', 'build_predictor', 'write_synthetic_slide', 'build_parser', 'main']

SUMMARY_FORMAT = 'timm-inception-pcam-slide/1'
PCAM_MPP = 0.972  # um/px of PCam patches: level 2 of Camelyon16's 0.243 um/px scans
TILE = PCAM_INPUT_SIZE[1]
PROGRESS_NAME = 'progress.npz'
FILES = {'probability': 'probability.npy', 'heatmap': 'heatmap.png', 'csv': 'tiles.csv', 'geojson': 'tiles.geojson',
         'summary': 'summary.json', 'progress': PROGRESS_NAME}
_READ_PX = 8192  # widest read, in level pixels: bounds the memory of one chunk (8192 x 96 x resample^2 x 4 bytes)
_THUMB_READ_PX = 1 << 23  # level pixels read at once while building the thumbnail

Predictor = Callable[[np.ndarray], np.ndarray]  # uint8 NHWC patches -> (N, num_classes) float probabilities


class SlideError(DataError):
    """A slide that cannot be used (missing, corrupt, unsupported, no resolution) or a run that cannot resume."""


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
        problems = []
        if not self.target_mpp > 0:
            problems.append(f'--target-mpp must be positive, got {self.target_mpp}')
        if self.mpp is not None and not self.mpp > 0:
            problems.append(f'--mpp must be positive (um per level-0 pixel), got {self.mpp}')
        if self.mpp_tolerance < 0:
            problems.append(f'--mpp-tolerance must be >= 0, got {self.mpp_tolerance}')
        if self.stride < 1:
            problems.append(f'--stride must be at least 1 pixel, got {self.stride}')
        if self.batch_size < 1:
            problems.append(f'--batch-size must be at least 1, got {self.batch_size}')
        for name in ('tissue_threshold', 'min_tissue', 'threshold'):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f'--{name.replace("_", "-")} must be in [0, 1], got {getattr(self, name)}')
        if self.thumbnail_size < 16:
            problems.append(f'--thumbnail-size must be at least 16 pixels, got {self.thumbnail_size}')
        if problems:
            raise ValueError('; '.join(problems))
        return self


# ----------------------------------------------------------------------------------------------- reading


class WholeSlide:
    """An OpenSlide handle whose failures become `SlideError`s naming the file; regions come back as RGB uint8."""

    def __init__(self, path: str | os.PathLike):
        try:
            import openslide
        except ImportError as e:  # openslide-python without the library, or neither installed
            raise ImportError(f'reading whole slides needs OpenSlide: pip install openslide-bin openslide-python '
                              f'({e})') from e
        self._openslide = openslide
        self.path = Path(path)
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


# ----------------------------------------------------------------------------------------------- geometry


def choose_level(level_mpps: Sequence[float], target_mpp: float = PCAM_MPP, tolerance: float = 0.1
                 ) -> tuple[int, float]:
    """(level, resample): the level to read and how many of its pixels make one tile pixel.

    The level closest to `target_mpp` (in ratio) is used as is when within `tolerance`; otherwise the coarsest
    level finer than the target is downsampled to it, or, when every level is coarser, the finest is upsampled.
    """
    if not level_mpps:
        raise ValueError('choose_level: no levels')
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


def _grid_count(size: float, tile: int, stride: int) -> int:
    return 1 if size <= tile else math.ceil((size - tile) / stride) + 1


def plan_grid(slide: WholeSlide, options: SlideOptions) -> tuple[TileGrid, str]:
    """The tile grid for a slide under `options`, and where the level-0 resolution came from."""
    mpp0, source = slide.mpp(options.mpp)
    level_mpps = [mpp0 * d for d in slide.level_downsamples]
    level, resample = choose_level(level_mpps, options.target_mpp, options.mpp_tolerance)
    lw, lh = slide.level_dimensions[level]
    grid = TileGrid(level=level, level_size=(lw, lh), level_downsample=slide.level_downsamples[level],
                    resample=resample, mpp0=mpp0, tile=TILE, stride=options.stride,
                    rows=_grid_count(lh / resample, TILE, options.stride),
                    cols=_grid_count(lw / resample, TILE, options.stride))
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


# ----------------------------------------------------------------------------------------------- progress


def _slide_identity(slide: WholeSlide) -> dict[str, Any]:
    stat = slide.path.stat()
    quickhash = slide.properties.get('openslide.quickhash-1')
    return {'name': slide.path.name, 'size': stat.st_size, 'quickhash': quickhash,
            'mtime_ns': None if quickhash else stat.st_mtime_ns}


def _fingerprint(slide: WholeSlide, grid: TileGrid, options: SlideOptions, run_info: dict[str, Any]) -> dict[str, Any]:
    """What the probability map depends on: a resume must match it exactly."""
    return {'slide': _slide_identity(slide), 'grid': asdict(grid), 'tissue_threshold': options.tissue_threshold,
            'min_tissue': options.min_tissue,
            'predictor': {k: run_info.get(k) for k in ('model', 'checkpoint_sha256', 'backend', 'use_ema')}}


def _save_progress(path: Path, prob: np.ndarray, tissue: np.ndarray, rows_done: int, fingerprint: dict) -> None:
    with atomic_path(path, suffix='.npz') as tmp:
        with open(tmp, 'wb') as f:
            np.savez(f, probability=prob, tissue=tissue, rows_done=np.int64(rows_done),
                     fingerprint=np.array(json.dumps(fingerprint, sort_keys=True)))


def _load_progress(path: Path, fingerprint: dict) -> tuple[np.ndarray, np.ndarray, int]:
    try:
        with np.load(path, allow_pickle=False) as z:
            found = json.loads(str(z['fingerprint']))
            prob, tissue, rows_done = z['probability'], z['tissue'], int(z['rows_done'])
    except (OSError, ValueError, KeyError) as e:
        raise SlideError(f'{path}: unreadable progress file ({e}); delete it or run without --resume') from e
    expected = json.loads(json.dumps(fingerprint, sort_keys=True))
    if found != expected:
        diffs = [k for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k)]
        detail = '; '.join(f'{k}: saved {found.get(k)!r}, now {expected.get(k)!r}' for k in diffs)
        raise SlideError(f'{path}: the saved progress was made with other settings ({detail}); run without '
                         f'--resume to start over')
    return prob, tissue, rows_done


# ----------------------------------------------------------------------------------------------- inference


def _class1(probs: Any, n: int) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 2 or probs.shape[0] != n or probs.shape[1] != PCAM_NUM_CLASSES:
        raise ValueError(f'predictor returned shape {tuple(probs.shape)} for {n} patches, expected ({n}, '
                         f'{PCAM_NUM_CLASSES}) probabilities ({", ".join(LABEL_NAMES)})')
    if not np.isfinite(probs).all() or probs.min() < -1e-4 or probs.max() > 1 + 1e-4:
        raise ValueError('predictor returned values outside [0, 1] or non-finite: expected softmax probabilities')
    return np.clip(probs[:, 1], 0.0, 1.0)


def run_slide(
        slide: WholeSlide | str | os.PathLike,
        predict: Predictor,
        out_dir: str | os.PathLike,
        options: SlideOptions = SlideOptions(),
        *,
        resume: bool = False,
        run_info: dict[str, Any] | None = None,
        progress: bool | None = None,
) -> dict[str, Any]:
    """Classify every tissue tile of a slide with `predict` and write the outputs; returns the summary.

    `run_info` (model, checkpoint, checkpoint_sha256, backend, ...) goes into the summary and into the fingerprint
    a resume is checked against.
    """
    options = options.check()
    if not isinstance(slide, WholeSlide):
        opened = open_slide(slide)
        try:
            return run_slide(opened, predict, out_dir, options, resume=resume, run_info=run_info, progress=progress)
        finally:
            opened.close()
    run_info = dict(run_info or {})
    out = Path(out_dir)
    grid, mpp_source = plan_grid(slide, options)
    fingerprint = _fingerprint(slide, grid, options, run_info)
    progress_path = out / PROGRESS_NAME
    prob = np.full((grid.rows, grid.cols), np.nan, dtype=np.float32)
    tissue = np.full((grid.rows, grid.cols), np.nan, dtype=np.float32)
    rows_done = 0
    if resume and progress_path.exists():
        prob, tissue, rows_done = _load_progress(progress_path, fingerprint)
        prob[rows_done:], tissue[rows_done:] = np.nan, np.nan  # rows after the last complete one are redone
        tqdm.write(f'slide: resuming {slide.path.name} at row {rows_done} of {grid.rows}')
    elif progress_path.exists():
        tqdm.write(f'slide: {progress_path} exists: starting over (pass --resume to continue it)')
    (out / FILES['summary']).unlink(missing_ok=True)  # present only once every output is complete
    start_row = rows_done

    classified = 0
    t0 = time.perf_counter()
    pending: list[tuple[int, int, np.ndarray]] = []  # (row, col, patch) waiting for a batch
    appended = rows_done  # rows whose tissue tiles are all in `pending` or classified

    def flush(limit: int) -> None:
        nonlocal classified
        while len(pending) >= limit and pending:
            batch = pending[:options.batch_size]
            p = _class1(predict(np.stack([t[2] for t in batch])), len(batch))
            rows = np.fromiter((t[0] for t in batch), np.int64, len(batch))
            cols = np.fromiter((t[1] for t in batch), np.int64, len(batch))
            prob[rows, cols] = p
            del pending[:len(batch)]
            classified += len(batch)

    def complete_rows() -> int:
        return min(pending[0][0], appended) if pending else appended

    bar = tqdm(total=grid.rows * grid.cols, initial=rows_done * grid.cols, unit='tile', desc=slide.path.name,
               disable=(not progress) if progress is not None else None, dynamic_ncols=True)
    saved_rows, last_save = rows_done, time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix='slide-read') as pool:
            future: Future | None = pool.submit(read_row, slide, grid, rows_done) if rows_done < grid.rows else None
            for r in range(rows_done, grid.rows):
                strip = future.result()
                future = pool.submit(read_row, slide, grid, r + 1) if r + 1 < grid.rows else None
                frac = tissue_fractions(strip, grid, options.tissue_threshold)
                tissue[r] = frac
                for c in np.flatnonzero(frac >= options.min_tissue):
                    x = int(c) * grid.stride
                    pending.append((r, int(c), strip[:, x:x + grid.tile].copy()))  # no strip outlives its row
                appended = r + 1
                flush(options.batch_size)
                bar.update(grid.cols)
                bar.set_postfix(tissue=classified + len(pending), refresh=False)
                if time.monotonic() - last_save >= options.save_every and r + 1 < grid.rows:
                    flush(1)
                    _save_progress(progress_path, prob, tissue, complete_rows(), fingerprint)
                    saved_rows, last_save = complete_rows(), time.monotonic()
            flush(1)
    except BaseException:
        if complete_rows() > saved_rows:  # keep what is finished, then let the interruption through
            _save_progress(progress_path, prob, tissue, complete_rows(), fingerprint)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    _save_progress(progress_path, prob, tissue, grid.rows, fingerprint)

    summary = {
        'format': SUMMARY_FORMAT,
        'slide': str(slide.path),
        'vendor': slide.vendor,
        'dimensions': list(slide.dimensions),
        'mpp': grid.mpp0,
        'mpp_source': mpp_source,
        'level': grid.level,
        'level_mpp': grid.mpp0 * grid.level_downsample,
        'resample': grid.resample,
        'tile_mpp': grid.tile_mpp,
        'tile_size': grid.tile,
        'stride': grid.stride,
        'grid': [grid.rows, grid.cols],
        **{k: getattr(options, k) for k in ('target_mpp', 'tissue_threshold', 'min_tissue', 'threshold')},
        **run_info,
        'resumed_from_row': start_row if start_row else None,
        'classified_this_run': classified,
        'seconds': round(seconds, 3),
        'tiles_per_second': round(classified / seconds, 3) if classified and seconds > 0 else None,
    }
    summary.update(write_outputs(slide, grid, prob, tissue, out, options, summary))
    tqdm.write(f"slide: {slide.path.name}: {summary['tissue_tiles']} tissue tiles of {grid.rows * grid.cols} at "
               f"{grid.tile_mpp:.3f} um/px (level {grid.level}"
               f"{f', resampled x{grid.resample:.3f}' if grid.resample != 1.0 else ''}), max P(metastatic) "
               f"{_fmt(summary['max_probability'])}, {summary['tiles_over_threshold']} tiles >= {options.threshold} "
               f"({summary['area_over_threshold_mm2']:.4f} mm2), "
               f"{_fmt(summary['tiles_per_second'], '.1f')} tiles/s -> {out}")
    return summary


def _fmt(value: float | None, spec: str = '.3f') -> str:
    return 'n/a' if value is None else format(value, spec)


# ----------------------------------------------------------------------------------------------- outputs


def write_outputs(slide: WholeSlide, grid: TileGrid, prob: np.ndarray, tissue: np.ndarray, out: Path,
                  options: SlideOptions, info: dict[str, Any]) -> dict[str, Any]:
    """Write the map, the heatmap, the tile lists and the summary (last); returns the summary's result fields."""
    classified = np.isfinite(prob)
    rows, cols = np.nonzero(classified & (prob >= options.threshold))
    order = np.lexsort((cols, rows, -prob[rows, cols]))
    rows, cols = rows[order], cols[order]
    x0, y0, side0 = grid.box0(rows, cols)
    cell_mm2 = (min(grid.stride, grid.tile) * grid.tile_mpp / 1000.0) ** 2
    with atomic_path(out / FILES['probability'], suffix='.npy') as tmp:
        np.save(tmp, prob)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(['row', 'col', 'x', 'y', 'width', 'height', 'probability', 'tissue_fraction'])
    features = []
    for r, c, x, y in zip(rows.tolist(), cols.tolist(), x0.tolist(), y0.tolist()):
        p, t = float(prob[r, c]), float(tissue[r, c])
        writer.writerow([r, c, round(x), round(y), round(side0), round(side0), f'{p:.6f}', f'{t:.4f}'])
        ring = [[round(x), round(y)], [round(x + side0), round(y)], [round(x + side0), round(y + side0)],
                [round(x), round(y + side0)], [round(x), round(y)]]
        features.append({'type': 'Feature', 'geometry': {'type': 'Polygon', 'coordinates': [ring]},
                         'properties': {'objectType': 'tile', 'classification': {'name': LABEL_NAMES[1]},
                                        'probability': round(p, 6), 'row': r, 'col': c}})
    atomic_write_bytes(out / FILES['csv'], buf.getvalue().encode())
    atomic_write_json(out / FILES['geojson'], {'type': 'FeatureCollection', 'features': features})

    n_tissue = int(classified.sum())
    result: dict[str, Any] = {
        'tissue_tiles': n_tissue,
        'tiles_over_threshold': len(rows),
        'max_probability': None,
        'max_location': None,
        'mean_probability': float(np.nanmean(prob)) if n_tissue else None,
        'tissue_area_mm2': n_tissue * cell_mm2,
        'area_over_threshold_mm2': len(rows) * cell_mm2,
    }
    if n_tissue:
        r, c = np.unravel_index(np.nanargmax(prob), prob.shape)
        x, y, side = grid.box0(np.array(r), np.array(c))
        result['max_probability'] = float(prob[r, c])
        result['max_location'] = {'x': round(float(x) + side / 2), 'y': round(float(y) + side / 2), 'row': int(r),
                                  'col': int(c)}
    _plot_heatmap(slide, grid, prob, out / FILES['heatmap'], options, result['max_probability'])
    result['files'] = {k: v for k, v in FILES.items()}
    atomic_write_json(out / FILES['summary'], {**info, **result})
    return result


def _plot_heatmap(slide: WholeSlide, grid: TileGrid, prob: np.ndarray, path: Path, options: SlideOptions,
                  max_prob: float | None) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    w0, h0 = slide.dimensions
    thumb = slide.thumbnail(options.thumbnail_size)
    aspect = thumb.shape[0] / thumb.shape[1]
    fig, ax = plt.subplots(figsize=(9.0, max(3.0, 9.0 * aspect) + 0.6), dpi=max(100, thumb.shape[1] // 8))
    ax.imshow(thumb, extent=(0, w0, h0, 0), interpolation='antialiased')
    cell0 = grid.stride * grid.scale0  # each cell drawn centred on its tile's centre
    left = (grid.tile / 2 - grid.stride / 2) * grid.scale0
    image = ax.imshow(np.ma.masked_invalid(prob), cmap='turbo', vmin=0.0, vmax=1.0, alpha=0.5,
                      interpolation='nearest',
                      extent=(left, left + grid.cols * cell0, left + grid.rows * cell0, left))
    ax.set_xlim(0, w0)
    ax.set_ylim(h0, 0)
    ax.set_axis_off()
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label=f'P({LABEL_NAMES[1]})')
    bar.solids.set_alpha(1.0)
    ax.set_title(f'{slide.path.name}: {grid.tile_mpp:.3f} um/px, stride {grid.stride}, '
                 f'max P = {_fmt(max_prob)}', fontsize=10)
    with atomic_path(path, suffix='.png') as tmp:
        fig.savefig(tmp, format='png', bbox_inches='tight')
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- predictors


def build_predictor(stack: ExitStack, model_name: str | None, checkpoint: str | None, backend: str = 'auto',
                    batch_size: int = 64, use_ema: bool = False, model_kwargs: dict[str, Any] | None = None,
                    thresholds: tuple[float, ...] = (0.5,)) -> tuple[Predictor, dict[str, Any]]:
    """Tile probabilities for a checkpoint (PyTorch, ONNX, or a TensorRT plan with its sidecar) and its run info.

    The runner comes from `timm_inception_pcam.inference.create_runner` (closed when `stack` closes); `backend` is
    one of its backends ('auto', 'eager', 'bf16', 'onnxruntime', 'tensorrt', ...). Torch models run on the CPU,
    plans on the GPU. `thresholds`: the tile probabilities at which `bf16_checked` (auto on AMX CPUs) keeps
    float32's decisions. The probability function is ``functools.partial(probabilities, runner)``.
    """
    import functools

    from .inference import create_runner, probabilities
    from .inference.factory import artefact_kind

    is_file = bool(checkpoint) and Path(str(checkpoint)).is_file()
    info: dict[str, Any] = {'model': model_name, 'checkpoint': checkpoint, 'backend': backend, 'use_ema': use_ema,
                            'checkpoint_sha256': file_sha256(checkpoint) if is_file else None}
    kind = artefact_kind(checkpoint) if checkpoint else 'module'
    if backend == 'tensorrt' and kind != 'tensorrt':
        raise SlideError(f'--backend tensorrt needs --checkpoint ENGINE.plan (built by export.trt, with its '
                         f'.json sidecar), got {checkpoint!r}')
    target: Any = checkpoint
    if not checkpoint:  # a registered model without weights
        from .checkpoint import load_model

        target = load_model(model_name, None, **(model_kwargs or {}))
    runner = create_runner(target, backend, 'auto' if kind == 'tensorrt' else 'cpu', batch_size=batch_size,
                           thresholds=tuple(t for t in thresholds if 0.0 < t < 1.0), model_name=model_name,
                           use_ema=use_ema, model_kwargs=model_kwargs)
    stack.callback(runner.close)
    if len(runner.spec.label_names) != PCAM_NUM_CLASSES:
        raise SlideError(f'{checkpoint}: model has {len(runner.spec.label_names)} classes, expected '
                         f'{PCAM_NUM_CLASSES} ({", ".join(LABEL_NAMES)})')
    sidecar = getattr(runner, 'sidecar', None)
    info['model'] = model_name or runner.spec.extra.get('model') or getattr(sidecar, 'model', None)
    info['backend'] = runner.spec.backend
    return functools.partial(probabilities, runner), info


# ----------------------------------------------------------------------------------------------- synthetic slide


def _render_blocks(rng: np.random.Generator, banks: tuple[np.ndarray, np.ndarray], n: int, tumour: bool
                   ) -> np.ndarray:
    """`n` synthetic PCam patches: positives, or negatives with no tumour cell anywhere (not even the ring)."""
    from .data.synth import render_patches

    if tumour:
        return render_patches(rng, np.ones(n, dtype=np.uint8), banks)[0]
    kept: list[np.ndarray] = []
    while sum(len(k) for k in kept) < n:
        patches, any_tumour = render_patches(rng, np.zeros(max(8, n), dtype=np.uint8), banks)
        kept.append(patches[~any_tumour])
    return np.concatenate(kept)[:n]


def write_synthetic_slide(
        path: str | os.PathLike,
        tissue: np.ndarray,
        tumour: np.ndarray,
        *,
        mpp: float = PCAM_MPP,
        upsample: int = 2,
        levels: int = 3,
        seed: int = 0,
        write_resolution: bool = True,
        aperio: bool = False,
        tile: int = 256,
) -> dict[str, Any]:
    """Write a pyramidal tiled TIFF painted with synthetic PCam patches, for tests, demos and benchmarks.

    `tissue` and `tumour` are bool (rows, cols) masks of 96-px blocks painted at `mpp` um/px: tissue blocks get a
    tumour-free negative patch, tumour blocks a positive one, the rest stays background. Level 0 is the painting
    upsampled `upsample` times (so at mpp / upsample um/px), each further level halves it. With `write_resolution`
    the TIFF carries its physical resolution (OpenSlide reports it as openslide.mpp-x/-y); with `aperio` the file is
    an Aperio SVS instead (resolution in the ImageDescription, as scanners write it). Returns the level-0 mpp,
    the block side in level-0 px and the level-0 boxes (x, y, w, h) of the tumour blocks.
    """
    import tifffile

    tissue = np.asarray(tissue, dtype=bool)
    tumour = np.asarray(tumour, dtype=bool) & tissue
    rng = np.random.default_rng(seed)
    from .data.synth import stamp_banks

    banks = stamp_banks(rng)
    rows, cols = tissue.shape
    painted = np.empty((rows * TILE, cols * TILE, 3), dtype=np.uint8)
    painted[:] = np.array([241, 238, 243], dtype=np.uint8)
    painted += rng.integers(0, 3, painted.shape, dtype=np.uint8)  # faint scanner noise, saturation well < 0.07
    for is_tumour in (False, True):
        where = np.argwhere(tissue & (tumour == is_tumour))
        patches = _render_blocks(rng, banks, len(where), is_tumour) if len(where) else []
        for (r, c), patch in zip(where, patches):
            painted[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = patch
    level0 = painted.repeat(upsample, axis=0).repeat(upsample, axis=1) if upsample > 1 else painted
    mpp0 = mpp / upsample
    with atomic_path(path, suffix='.tif') as tmp:
        with tifffile.TiffWriter(tmp) as tw:
            image = level0
            for i in range(levels):
                kwargs: dict[str, Any] = {}
                if aperio:
                    h0, w0 = level0.shape[:2]
                    if i == 0:
                        mpp_field = f'|MPP = {mpp0:.6f}' if write_resolution else ''
                        detail = f'[0,0 {w0}x{h0}] ({tile}x{tile}) ZLIB/RGB|AppMag = 20{mpp_field}'
                    else:
                        detail = f'-> {image.shape[1]}x{image.shape[0]}'
                    kwargs = {'description': f'Aperio Image Library v12.0.15 \r\n{w0}x{h0} {detail}', 'metadata': None}
                elif write_resolution:
                    kwargs = {'resolution': (1e4 / (mpp0 * 2 ** i),) * 2, 'resolutionunit': 'CENTIMETER'}
                tw.write(image, photometric='rgb', tile=(tile, tile), compression='zlib',
                         subfiletype=1 if i else 0, **kwargs)
                if min(image.shape[:2]) < 2 * tile:
                    break
                h2, w2 = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
                image = image[:h2, :w2].reshape(h2 // 2, 2, w2 // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    block0 = TILE * upsample
    boxes = [(int(c) * block0, int(r) * block0, block0, block0) for r, c in np.argwhere(tumour)]
    return {'path': Path(path), 'mpp': mpp0, 'block': block0, 'tumour_boxes': boxes, 'tissue': tissue,
            'tumour': tumour}


# ----------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    from timm.utils import ParseKwargs

    from .inference import BACKENDS

    p = argparse.ArgumentParser(prog='python -m timm_inception_pcam.slide', description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('slide', metavar='SLIDE', help='whole-slide image (tiled/pyramidal TIFF, SVS, NDPI, MRXS, ...)')
    p.add_argument('--model', default=None, help='registered model name (default: the checkpoint\'s arch)')
    p.add_argument('--checkpoint', default=None,
                   help='PyTorch checkpoint / .safetensors / hf-hub:org/name, an .onnx model, or a TensorRT .plan')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='extra model arguments')
    p.add_argument('--use-ema', action='store_true', help='the checkpoint\'s EMA weights')
    p.add_argument('--backend', default='auto', choices=('auto', *BACKENDS),
                   help='auto: the fastest CPU path (inference layer); tensorrt: a .plan on an NVIDIA GPU')
    p.add_argument('--out', '--output', dest='out', required=True, help='output folder for this slide')
    p.add_argument('--mpp', type=float, default=None, help='level-0 um/px, overriding the slide metadata')
    p.add_argument('--target-mpp', type=float, default=PCAM_MPP, help='tile resolution (PCam: 0.972 um/px)')
    p.add_argument('--mpp-tolerance', type=float, default=0.1,
                   help='relative distance within which a pyramid level is used without resampling')
    p.add_argument('--stride', type=int, default=TILE, help='tile stride in pixels at the tile resolution')
    p.add_argument('-b', '--batch-size', type=int, default=64)
    p.add_argument('--tissue-threshold', type=float, default=0.07, help='HSV saturation of tissue pixels')
    p.add_argument('--min-tissue', type=float, default=0.25, help='fraction of tissue pixels a tile needs')
    p.add_argument('--threshold', type=float, default=0.5, help='probability listed in tiles.csv/.geojson')
    p.add_argument('--resume', action='store_true', help='continue from <out>/progress.npz (same settings)')
    p.add_argument('--save-every', type=float, default=30.0, help='seconds between progress saves')
    p.add_argument('--thumbnail-size', type=int, default=2048, help='longer side of the heatmap background')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run whole-slide inference; returns the summary (also written to <out>/summary.json)."""
    args = build_parser().parse_args(argv)
    options = SlideOptions(target_mpp=args.target_mpp, mpp=args.mpp, mpp_tolerance=args.mpp_tolerance,
                           stride=args.stride, batch_size=args.batch_size, tissue_threshold=args.tissue_threshold,
                           min_tissue=args.min_tissue, threshold=args.threshold, save_every=args.save_every,
                           thumbnail_size=args.thumbnail_size).check()
    slide = open_slide(args.slide)  # a bad slide fails before any model is loaded
    with ExitStack() as stack:
        stack.callback(slide.close)
        plan_grid(slide, options)  # and so does a slide without a resolution
        predict, info = build_predictor(stack, args.model, args.checkpoint, args.backend, args.batch_size,
                                        args.use_ema, args.model_kwargs, thresholds=tuple({0.5, options.threshold}))
        return run_slide(slide, predict, args.out, options, resume=args.resume, run_info=info,
                         progress=False if args.no_progress else None)


def cli(argv: list[str] | None = None) -> int:
    """Command-line entry: bad input ends with a one-line error (exit 2) instead of a traceback."""
    try:
        main(argv)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:
        print(f'slide: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(cli())
