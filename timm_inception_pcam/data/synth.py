"""Synthetic PatchCamelyon: H&E-like patches in the exact official file layout.

Tissue is rendered in optical-density space with the standard haematoxylin / eosin stain vectors
(Ruifrok & Johnston), so colours, stain jitter and HED-space augmentations behave as on real slides.
Every patch carries small round lymphocyte-like nuclei; tumour-like cells (large, dark, crowded,
irregular nuclei with chromatin texture) form clusters. The label follows PCam's rule: 1 when tumour
cells lie in the centre 32x32 region. Half of the negatives carry a tumour cluster in the outer ring
only, so a model has to learn where to look.
"""
import csv
import gzip
import io
import shutil
from pathlib import Path

import h5py
import numpy as np

from ..errors import OutputExistsError, UsageError
from ..storage import atomic_path, atomic_write_json
from .files import META_COLUMNS, SPLIT_FILE_KEYS, split_file
from .provenance import SYNTH_INFO, SYNTHETIC, file_provenance, mark_synthetic

__all__ = ['synthesize_pcam', 'render_patches', 'stamp_banks']

SIZE = 96
GENERATOR = 'timm_inception_pcam.data.synth'
CENTRE = (32, 64)  # [start, stop) of the label region on both axes
# Stain vectors (rows: haematoxylin, eosin), optical density per unit concentration, RGB order.
_H_VEC = np.array([0.650, 0.704, 0.286], dtype=np.float32)
_E_VEC = np.array([0.072, 0.990, 0.105], dtype=np.float32)
_STAMP_T = 21  # tumour nucleus stamp size (odd)
_STAMP_N = 9  # lymphocyte stamp size (odd)
_BANK = 192  # stamps per kind
_CHUNK = 512  # patches rendered (and written) at a time
# A tumour nucleus centre this far outside the centre box cannot put a pixel inside it.
_RING_MARGIN = _STAMP_T // 2 + 1


def _stamp_bank(rng: np.random.Generator, size: int, r_lo: float, r_hi: float, irregular: float,
                texture: float) -> np.ndarray:
    """(K, size, size) float32 alpha masks of nuclei with random radius, elongation, outline and chromatin."""
    c = size // 2
    yy, xx = np.mgrid[-c:c + 1, -c:c + 1].astype(np.float32)
    radius = rng.uniform(r_lo, r_hi, (_BANK, 1, 1)).astype(np.float32)
    angle = rng.uniform(0, np.pi, (_BANK, 1, 1)).astype(np.float32)
    stretch = rng.uniform(1.0, 1.0 + 0.6 * irregular + 0.15, (_BANK, 1, 1)).astype(np.float32)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    dist = np.sqrt((u / stretch) ** 2 + (v * stretch) ** 2)
    theta = np.arctan2(v, u)
    outline = np.ones_like(dist)
    for k in (2, 3, 5):
        amp = rng.uniform(0, irregular / k, (_BANK, 1, 1)).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, (_BANK, 1, 1)).astype(np.float32)
        outline = outline + amp * np.cos(k * theta + phase)
    alpha = 1.0 / (1.0 + np.exp(-(radius * outline - dist) * 2.5))
    if texture > 0:
        grain = rng.normal(0, 1, alpha.shape).astype(np.float32)
        rim = np.exp(-((radius * outline - dist) ** 2))  # darker nuclear membrane
        alpha = alpha * (1.0 + texture * grain) + 0.35 * texture * rim * alpha
    return np.clip(alpha, 0, None).astype(np.float32)


def _upsample_matrix(n_in: int, n_out: int = SIZE) -> np.ndarray:
    """(n_out, n_in) linear-interpolation matrix for separable smooth noise."""
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (pos - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), lo] += 1 - w
    m[np.arange(n_out), hi] += w
    return m


def _smooth_noise(rng: np.random.Generator, b: int, grid: int) -> np.ndarray:
    m = _upsample_matrix(grid)
    g = rng.random((b, grid, grid), dtype=np.float32)
    return np.einsum('yi,bij,xj->byx', m, g, m, optimize=True)


def _splat(b: int, patch: np.ndarray, cy: np.ndarray, cx: np.ndarray, stamps: np.ndarray,
           weight: np.ndarray) -> np.ndarray:
    """Sum weighted stamps centred at (cy, cx) of patches `patch` into a (b, 96, 96) canvas."""
    s = stamps.shape[-1]
    pad = s // 2
    side = SIZE + 2 * pad
    if len(patch) == 0:
        return np.zeros((b, SIZE, SIZE), dtype=np.float32)
    dy, dx = np.mgrid[0:s, 0:s]
    base = patch * side * side + cy * side + cx  # top-left of each stamp in the padded canvas
    idx = base[:, None, None] + dy[None] * side + dx[None]
    vals = stamps * weight[:, None, None]
    canvas = np.bincount(idx.ravel(), weights=vals.ravel(), minlength=b * side * side)
    return canvas.reshape(b, side, side)[:, pad:pad + SIZE, pad:pad + SIZE].astype(np.float32)


def _in_ring(cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
    lo, hi = CENTRE[0] - _RING_MARGIN, CENTRE[1] - 1 + _RING_MARGIN
    return (cy < lo) | (cy > hi) | (cx < lo) | (cx > hi)


def _cluster(rng: np.random.Generator, owner: np.ndarray, centre_y: np.ndarray, centre_x: np.ndarray,
             count: np.ndarray, spread: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian clusters of nucleus centres; returns (patch index, y, x) clipped to the patch."""
    rep = np.repeat(np.arange(len(owner)), count)
    y = np.rint(centre_y[rep] + rng.normal(0, 1, len(rep)) * spread[rep]).astype(np.int64)
    x = np.rint(centre_x[rep] + rng.normal(0, 1, len(rep)) * spread[rep]).astype(np.int64)
    keep = (y >= 0) & (y < SIZE) & (x >= 0) & (x < SIZE)
    return owner[rep][keep], y[keep], x[keep]


def render_patches(rng: np.random.Generator, labels: np.ndarray, banks: tuple[np.ndarray, np.ndarray]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Render uint8 (B, 96, 96, 3) patches for the given 0/1 labels; also return a bool 'any tumour' flag."""
    tumour_bank, lymph_bank = banks
    b = len(labels)
    pos = np.flatnonzero(labels == 1)
    neg = np.flatnonzero(labels == 0)
    ring_neg = neg[rng.random(len(neg)) < 0.5]

    # Tumour clusters: centred in the label region for positives (often spreading as a sheet),
    # in the outer ring for the chosen negatives (kept only where no pixel can reach the centre).
    t_patches, t_ys, t_xs = [], [], []
    if len(pos):
        cy = rng.uniform(CENTRE[0] + 3, CENTRE[1] - 3, len(pos))
        cx = rng.uniform(CENTRE[0] + 3, CENTRE[1] - 3, len(pos))
        sheet = rng.random(len(pos)) < 0.35
        spread = np.where(sheet, rng.uniform(14, 26, len(pos)), rng.uniform(4, 9, len(pos)))
        count = np.where(sheet, rng.integers(18, 40, len(pos)), rng.integers(4, 11, len(pos)))
        o, y, x = _cluster(rng, pos, cy, cx, count, spread)
        # one guaranteed nucleus right at the cluster centre, inside the label region
        t_patches += [pos, o]
        t_ys += [np.rint(cy).astype(np.int64), y]
        t_xs += [np.rint(cx).astype(np.int64), x]
    if len(ring_neg):
        side = rng.integers(0, 4, len(ring_neg))
        along = rng.uniform(8, SIZE - 8, len(ring_neg))
        depth = rng.uniform(3, 14, len(ring_neg))
        cy = np.select([side == 0, side == 1, side == 2], [depth, SIZE - 1 - depth, along], along)
        cx = np.select([side == 0, side == 1, side == 2], [along, along, depth], SIZE - 1 - depth)
        count = rng.integers(4, 16, len(ring_neg))
        o, y, x = _cluster(rng, ring_neg, cy, cx, count, rng.uniform(4, 10, len(ring_neg)))
        ok = _in_ring(y, x)
        t_patches.append(o[ok])
        t_ys.append(y[ok])
        t_xs.append(x[ok])
    empty = np.zeros(0, np.int64)
    t_patch = np.concatenate(t_patches) if t_patches else empty
    t_y = np.concatenate(t_ys) if t_ys else empty
    t_x = np.concatenate(t_xs) if t_xs else empty
    tumour_any = np.zeros(b, dtype=bool)
    tumour_any[t_patch] = True

    # Lymphocyte-like nuclei everywhere: uniform scatter plus occasional dense follicles.
    dens = rng.integers(10, 60, b)
    l_patch = np.repeat(np.arange(b), dens)
    l_y = rng.integers(0, SIZE, len(l_patch))
    l_x = rng.integers(0, SIZE, len(l_patch))
    dense = np.flatnonzero(rng.random(b) < 0.3)
    if len(dense):
        o, y, x = _cluster(rng, dense, rng.uniform(0, SIZE, len(dense)), rng.uniform(0, SIZE, len(dense)),
                           rng.integers(20, 60, len(dense)), rng.uniform(6, 16, len(dense)))
        l_patch, l_y, l_x = np.concatenate([l_patch, o]), np.concatenate([l_y, y]), np.concatenate([l_x, x])

    t_stamps = tumour_bank[rng.integers(0, len(tumour_bank), len(t_patch))]
    l_stamps = lymph_bank[rng.integers(0, len(lymph_bank), len(l_patch))]
    hema = _splat(b, t_patch, t_y, t_x, t_stamps, rng.uniform(0.9, 1.3, len(t_patch)))
    hema += _splat(b, l_patch, l_y, l_x, l_stamps, rng.uniform(0.7, 1.2, len(l_patch)))
    hema = np.minimum(hema, 1.6)

    # Stroma: smooth eosin field with fibre-scale texture and pale gaps (fat, lumen, tears).
    low = _smooth_noise(rng, b, 5)
    mid = _smooth_noise(rng, b, 16)
    fine = _smooth_noise(rng, b, 40)
    eosin = (0.25 + 0.75 * low) * (0.55 + 0.45 * mid + 0.3 * fine)
    pale = np.clip((0.3 - low) * 4, 0, 1) * (rng.random((b, 1, 1)) < 0.4)
    eosin = eosin * (1 - 0.85 * pale)

    # Per-patch stain strength (slide-to-slide variation) and a faint haematoxylin counterstain.
    h_scale = rng.uniform(0.65, 1.3, (b, 1, 1)).astype(np.float32)
    e_scale = rng.uniform(0.35, 0.75, (b, 1, 1)).astype(np.float32)
    h_conc = (hema * 0.95 + 0.06 + 0.04 * fine) * h_scale
    e_conc = eosin * e_scale + 0.12 * hema * e_scale
    od = h_conc[..., None] * _H_VEC + e_conc[..., None] * _E_VEC
    rgb = 255.0 * np.exp(-od) + rng.normal(0, 3.0, od.shape).astype(np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), tumour_any


def _balanced_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    labels = np.zeros(n, dtype=np.uint8)
    labels[: (n + 1) // 2] = 1
    rng.shuffle(labels)
    return labels


def _write_split(root: Path, split: str, n: int, rng: np.random.Generator,
                 banks: tuple[np.ndarray, np.ndarray]) -> dict[str, Path]:
    x_path, y_path, meta_path = (root / split_file(split, k) for k in SPLIT_FILE_KEYS)
    labels = _balanced_labels(rng, n)
    tumour_any = np.zeros(n, dtype=bool)
    with atomic_path(x_path) as tmp_x:
        with h5py.File(tmp_x, 'w') as f:
            mark_synthetic(f, generator=GENERATOR)
            ds = f.create_dataset('x', shape=(n, SIZE, SIZE, 3), dtype=np.uint8)
            for start in range(0, n, _CHUNK):
                stop = min(start + _CHUNK, n)
                ds[start:stop], tumour_any[start:stop] = render_patches(rng, labels[start:stop], banks)
    with atomic_path(y_path) as tmp_y:
        with h5py.File(tmp_y, 'w') as f:
            mark_synthetic(f, generator=GENERATOR)
            f.create_dataset('y', data=labels.reshape(n, 1, 1, 1))
    # Meta: patches come from a few synthetic slides, with slide coordinates at level 0.
    n_slides = max(1, n // 2048 + 3)
    slide = np.sort(rng.integers(0, n_slides, n))
    kind = np.where(rng.random(n_slides) < 0.5, 'tumor', 'normal')
    coord_y = rng.integers(0, 200_000, n)
    coord_x = rng.integers(0, 100_000, n)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(['', *META_COLUMNS])
    for i in range(n):
        writer.writerow([i, int(coord_y[i]), int(coord_x[i]), str(bool(tumour_any[i])), str(bool(labels[i])),
                         f'synthetic_{split}_{kind[slide[i]]}_{slide[i]:03d}'])
    with atomic_path(meta_path) as tmp_m:
        tmp_m.write_text(buf.getvalue())
    return {'x': x_path, 'y': y_path, 'meta': meta_path}


def _gzip_file(path: Path) -> Path:
    """Compress `path` to `path.gz` (atomic) and remove the original, as the files are distributed."""
    out = path.with_name(path.name + '.gz')
    with atomic_path(out) as tmp, open(path, 'rb') as src, gzip.GzipFile(tmp, 'wb', compresslevel=1, mtime=0) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    path.unlink()
    return out


def stamp_banks(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The (tumour, lymphocyte) nucleus stamps `render_patches` paints with."""
    return (_stamp_bank(rng, _STAMP_T, 4.5, 8.0, irregular=0.45, texture=0.35),
            _stamp_bank(rng, _STAMP_N, 2.0, 3.3, irregular=0.08, texture=0.0))


def synthesize_pcam(root: str | Path, n: int, seed: int = 0, n_valid: int | None = None,
                    n_test: int | None = None, gzip: bool = False) -> dict[str, Path]:
    """Write a synthetic PCam set (train `n`, valid/test default n // 8) in the official layout under `root`.

    Returns {'train_x': path, 'train_y': ..., 'train_meta': ..., 'valid_x': ...}. With `gzip` the image and
    label files are written as `.h5.gz`, as distributed. Deterministic for a given seed and sizes.
    """
    sizes = {'train': n, 'valid': max(1, n // 8) if n_valid is None else n_valid,
             'test': max(1, n // 8) if n_test is None else n_test}
    for split, count in sizes.items():
        if int(count) < 1:
            raise UsageError(f'synthesize_pcam: the {split} split needs at least 1 patch, got {count}')
    root = Path(root)
    for split in sizes:
        for key in ('x', 'y'):
            existing = root / split_file(split, key)
            for path in (existing, existing.with_name(existing.name + '.gz')):
                ours = (root / SYNTH_INFO).is_file() if path.suffix == '.gz' else file_provenance(path) == SYNTHETIC
                if path.exists() and not ours:
                    raise OutputExistsError(f'{path}: a PCam file not written by synth is already there; refusing to '
                                      f'overwrite it (expected an empty folder or an earlier synthetic set)')
    root.mkdir(parents=True, exist_ok=True)
    seq = np.random.SeedSequence(seed)
    bank_seq, *split_seqs = seq.spawn(4)
    bank_rng = np.random.default_rng(bank_seq)
    banks = stamp_banks(bank_rng)
    out: dict[str, Path] = {}
    for (split, count), split_seq in zip(sizes.items(), split_seqs):
        paths = _write_split(root, split, int(count), np.random.default_rng(split_seq), banks)
        for key, path in paths.items():
            if gzip and key != 'meta':
                path = _gzip_file(path)
            out[f'{split}_{key}'] = path
    atomic_write_json(root / SYNTH_INFO, {
        'provenance': SYNTHETIC, 'generator': GENERATOR, 'seed': seed, 'sizes': sizes,
        'note': 'synthetic H&E-like patches in the PCam file layout; results on them are not PCam results'})
    return out
