"""A cohort of slides: Ray workers (`timm_inception_pcam.cohort`) vs the single-slide command run slide after slide.

    python -m benchmarks.run --sections cohort [--quick]

The same synthetic cohort (slides of different sizes) both ways, on this machine: the single-slide command as a user
would script it (one process per slide: model loaded each time, torch's own threads) and the cohort with 2 Ray
workers of 1 thread each (one predictor per worker, loaded once, largest slides first). Throughput does not depend
on the weights, so the model is randomly initialised; backend `channels_last` both ways (float32, deterministic).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from timm_inception_pcam.checkpoint import save_checkpoint
from timm_inception_pcam.data.synth_slide import write_synthetic_slide

from .common import FULL, QUICK, create
from .slide import synthetic_masks

__all__ = ['benchmark_cohort', 'markdown']

WORKERS = 2
SLIDE_OPTIONS = ['--thumbnail-size', '256', '--backend', 'channels_last', '--no-progress']


def benchmark_cohort(quick: bool = True) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    shapes = [(4, 5), (5, 6), (6, 8), (8, 10)] if quick else [(8, 10), (10, 12), (12, 16), (16, 20), (14, 18),
                                                              (10, 14)]
    name = sizes.backend_models[0]
    with tempfile.TemporaryDirectory(prefix='pcam-cohort-bench-') as tmp:
        tmp = Path(tmp)
        slides, tiles = [], 0
        for i, (rows, cols) in enumerate(shapes):
            tissue, tumour = synthetic_masks(rows, cols)
            slides.append(str(write_synthetic_slide(tmp / f'slide{i}.tif', tissue, tumour, seed=i)['path']))
            tiles += int(tissue.sum())
        kwargs = {'depths': sizes.depths} if sizes.depths else {}
        checkpoint = save_checkpoint(tmp / 'model.pth', create(name, sizes), arch=name, model_kwargs=kwargs)
        common = ['--checkpoint', str(checkpoint), *SLIDE_OPTIONS]

        t0 = time.perf_counter()
        for i, slide in enumerate(slides):  # the single-slide command, one process per slide
            subprocess.run([sys.executable, '-m', 'timm_inception_pcam.slide', slide, '--out', str(tmp / f's{i}'),
                            *common], check=True, capture_output=True, timeout=3600)
        sequential = time.perf_counter() - t0

        t0 = time.perf_counter()
        subprocess.run([sys.executable, '-m', 'timm_inception_pcam.cohort', *slides, '--out', str(tmp / 'cohort'),
                        '--workers', str(WORKERS), '--threads', '1', *common], check=True, capture_output=True,
                       timeout=3600)
        cohort = time.perf_counter() - t0
        same = all(np.array_equal(np.load(tmp / f's{i}' / 'probability.npy'),
                                  np.load(tmp / 'cohort' / Path(s).stem / 'probability.npy'), equal_nan=True)
                   for i, s in enumerate(slides))
    return {
        'model': name, 'depths': sizes.depths, 'slides': len(slides), 'tissue_tiles': tiles, 'workers': WORKERS,
        'runs': [
            {'how': 'single-slide command, slide after slide', 'seconds': round(sequential, 2),
             'slides_per_s': len(slides) / sequential, 'tiles_per_s': tiles / sequential},
            {'how': f'cohort, Ray, {WORKERS} workers x 1 thread', 'seconds': round(cohort, 2),
             'slides_per_s': len(slides) / cohort, 'tiles_per_s': tiles / cohort},
        ],
        'speedup': sequential / cohort, 'identical_outputs': same,
        'note': 'wall time of each command, process start-up and model loading included (Ray start-up for the '
                'cohort); synthetic slides',
    }


def markdown(section: dict[str, Any], fmt) -> list[str]:
    lines = [f'{section["slides"]} synthetic slides ({section["tissue_tiles"]} tissue tiles), `{section["model"]}`'
             f'{" depths " + str(section["depths"]) if section["depths"] else ""}, channels_last; '
             f'{section["note"]}. Outputs identical both ways: {section["identical_outputs"]}.', '',
             '| how | seconds | slides/s | tiles/s |', '| --- | --- | --- | --- |']
    lines += [f'| {r["how"]} | {fmt(r["seconds"])} | {fmt(r["slides_per_s"])} | {fmt(r["tiles_per_s"])} |'
              for r in section['runs']]
    return lines + ['', f'Cohort vs slide after slide: {fmt(section["speedup"])}x.', '']
