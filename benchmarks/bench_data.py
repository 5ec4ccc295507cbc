"""Data readers side by side: our PCamDataset vs torchvision.datasets.PCAM vs timm's ImageFolder reading PNGs.

    python -m benchmarks.bench_data            # 1 to 4 minutes on 2 cores
    python -m benchmarks.bench_data --quick    # smoke test, tiny sizes

Same synthetic patches for all three (HDF5 for ours and torchvision's, the PNG tree `convert` writes for timm's),
same work per item: uint8 patch -> normalised float32 CHW tensor, batches of 64 in a shuffled order drawn once.
Reported: patches/s without a DataLoader (item by item, the 'per-item' figure) and through a DataLoader with 1 and
2 workers (persistent, warmed up), median of repeats, and ratios against torchvision's PCAM.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from timm_inception_pcam.errors import ArgumentParser

__all__ = ['run', 'main']

BATCH = 64


def _normalise_tensor() -> Callable:
    from torchvision import transforms

    from timm_inception_pcam.constants import PCAM_MEAN, PCAM_STD

    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(PCAM_MEAN, PCAM_STD)])


def _readers(h5_root: Path, folder: Path) -> dict[str, Callable[[], torch.utils.data.Dataset]]:
    from timm.data import create_dataset
    from torchvision.datasets import PCAM

    from timm_inception_pcam.data import PCamDataset, create_pcam_transform

    tv_root = h5_root.parent / 'tv'
    (tv_root / 'pcam').mkdir(parents=True, exist_ok=True)
    for p in h5_root.glob('*.h5'):  # torchvision looks in <root>/pcam/
        link = tv_root / 'pcam' / p.name
        if not link.exists():
            link.symlink_to(p.resolve())
    tf = _normalise_tensor()
    return {
        'ours (PCamDataset)': lambda: PCamDataset(h5_root, 'train', transform=create_pcam_transform(False)),
        'ours, in_memory': lambda: PCamDataset(h5_root, 'train', transform=create_pcam_transform(False),
                                               in_memory=True),
        'torchvision PCAM': lambda: PCAM(str(tv_root), 'train', transform=tf),
        'timm ImageFolder (PNG)': lambda: create_dataset('', root=str(folder), split='train', transform=tf),
    }


def _per_item(ds: torch.utils.data.Dataset, order: np.ndarray) -> float:
    start = time.perf_counter()
    for i in order:
        ds[int(i)]
    return len(order) / (time.perf_counter() - start)


def _loader_rate(ds: torch.utils.data.Dataset, order: np.ndarray, workers: int, repeats: int) -> float:
    batches = [order[i:i + BATCH].tolist() for i in range(0, len(order), BATCH)]
    # a batch sampler of index lists: a dataset with __getitems__ gets each batch in one call
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers,
                                         persistent_workers=workers > 0)
    rates = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        n = sum(len(batch[1]) for batch in loader)
        if r:  # the first epoch starts the workers and warms the caches
            rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def _markdown(rows: list[dict[str, Any]], n: int, base: str) -> str:
    lines = [f'Synthetic PCam, {n} patches read in a shuffled order, batch {BATCH}; patches/s (ratio vs {base}).', '',
             '| reader | per item, no DataLoader | DataLoader, 1 worker | DataLoader, 2 workers |',
             '| --- | --- | --- | --- |']
    for row in rows:
        cells = [f'{row[k]:,.0f} ({row[k + "_ratio"]:.1f}x)' for k in ('per_item', 'workers_1', 'workers_2')]
        lines.append(f'| {row["reader"]} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def run(quick: bool = False) -> dict[str, Any]:
    """Run the comparison; returns figures, ratios vs torchvision's PCAM and a markdown table."""
    from timm_inception_pcam.data import convert_pcam, synthesize_pcam

    n = 256 if quick else 4096
    n_items = 128 if quick else 1024  # per-item loop (torchvision reopens two files per item: keep it bounded)
    repeats = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix='bench_data_') as tmp:
        h5_root, folder = Path(tmp) / 'h5', Path(tmp) / 'folder'
        synthesize_pcam(h5_root, n, seed=0, n_valid=1, n_test=1)
        convert_pcam(h5_root, folder, 'folder', splits=['train'], workers=2, progress=False)
        rng = np.random.default_rng(0)
        order = rng.permutation(n)
        rows = []
        for name, make in _readers(h5_root, folder).items():
            ds = make()
            rows.append({'reader': name, 'per_item': _per_item(ds, order[:n_items]),
                         'workers_1': _loader_rate(ds, order, 1, repeats),
                         'workers_2': _loader_rate(ds, order, 2, repeats)})
    base_name = 'torchvision PCAM'
    base = next(r for r in rows if r['reader'] == base_name)
    for row in rows:
        for k in ('per_item', 'workers_1', 'workers_2'):
            row[k + '_ratio'] = row[k] / base[k]
    ours = rows[0]
    folder_row = next(r for r in rows if r['reader'].startswith('timm ImageFolder'))
    return {'status': 'ok', 'n': n, 'batch': BATCH, 'repeats': repeats, 'cpu_count': os.cpu_count(),
            'torch_threads': torch.get_num_threads(), 'rows': rows,
            'ours_vs_torchvision_per_item': ours['per_item_ratio'],
            'ours_vs_torchvision_1_worker': ours['workers_1_ratio'],
            'ours_vs_imagefolder_1_worker': ours['workers_1'] / folder_row['workers_1'],
            'ours_vs_imagefolder_2_workers': ours['workers_2'] / folder_row['workers_2'],
            'markdown': _markdown(rows, n, base_name)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = ArgumentParser(prog='python -m benchmarks.bench_data', description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='tiny sizes (a smoke test, not figures to quote)')
    p.add_argument('--output', default=None, help='also write the figures to this JSON file')
    args = p.parse_args(argv)
    result = run(quick=args.quick)
    print(result['markdown'])
    if args.output:
        from timm_inception_pcam.storage import atomic_write_json

        atomic_write_json(args.output, result)
    print(f'bench_data: ours {result["ours_vs_torchvision_per_item"]:.1f}x torchvision per item, '
          f'{result["ours_vs_imagefolder_1_worker"]:.1f}x ImageFolder PNG with 1 worker')
    return result


if __name__ == '__main__':
    main()
