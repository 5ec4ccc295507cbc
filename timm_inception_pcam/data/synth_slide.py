"""A synthetic whole slide: a pyramidal tiled TIFF (or Aperio SVS) painted with synthetic PCam patches.

For tests, demos and benchmarks of whole-slide inference (`timm_inception_pcam.wsi`): tissue and tumour blocks are
placed where the caller says, so a heatmap can be checked against known positions.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..storage import atomic_path
from ..wsi.options import PCAM_MPP, TILE
from .synth import render_patches, stamp_banks

__all__ = ['write_synthetic_slide']


def _render_blocks(rng: np.random.Generator, banks: tuple[np.ndarray, np.ndarray], n: int, tumour: bool
                   ) -> np.ndarray:
    """`n` synthetic PCam patches: positives, or negatives with no tumour cell anywhere (not even the ring)."""
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
