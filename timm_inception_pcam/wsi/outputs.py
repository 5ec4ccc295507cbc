"""What a slide run leaves behind: the probability map, the heatmap, the tile lists and the summary (written last)."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import LABEL_NAMES
from ..storage import atomic_path, atomic_write_bytes, atomic_write_json
from .grid import TileGrid
from .options import SlideOptions
from .reader import WholeSlide

__all__ = ['FILES', 'PROGRESS_NAME', 'write_outputs', 'fmt', 'caveat']

PROGRESS_NAME = 'progress.npz'
FILES = {'probability': 'probability.npy', 'heatmap': 'heatmap.png', 'csv': 'tiles.csv', 'geojson': 'tiles.geojson',
         'summary': 'summary.json', 'progress': PROGRESS_NAME}


def fmt(value: float | None, spec: str = '.3f') -> str:
    return 'n/a' if value is None else format(value, spec)


def caveat(info: dict[str, Any]) -> str:
    """What the heatmap title and the final line add about the weights: none, or synthetic training data."""
    if info.get('random_weights'):
        return ' (random weights: no checkpoint)'
    return ' (model trained on synthetic data)' if info.get('data_provenance') == 'synthetic' else ''


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
    plot_heatmap(slide, grid, prob, out / FILES['heatmap'], options, result['max_probability'], caveat(info))
    result['files'] = dict(FILES)
    atomic_write_json(out / FILES['summary'], {**info, **result})
    return result


def plot_heatmap(slide: WholeSlide, grid: TileGrid, prob: np.ndarray, path: Path, options: SlideOptions,
                 max_prob: float | None, note: str = '') -> None:
    """The probability map drawn over the slide thumbnail, each cell centred on its tile's centre."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    w0, h0 = slide.dimensions
    thumb = slide.thumbnail(options.thumbnail_size)
    aspect = thumb.shape[0] / thumb.shape[1]
    fig, ax = plt.subplots(figsize=(9.0, max(3.0, 9.0 * aspect) + 0.6), dpi=max(100, thumb.shape[1] // 8))
    ax.imshow(thumb, extent=(0, w0, h0, 0), interpolation='antialiased')
    cell0 = grid.stride * grid.scale0
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
                 f'max P = {fmt(max_prob)}{note}', fontsize=10)
    with atomic_path(path, suffix='.png') as tmp:
        fig.savefig(tmp, format='png', bbox_inches='tight')
    plt.close(fig)
