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
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

from ..errors import ArgumentParser
from .grid import plan_grid
from .options import PCAM_MPP, TILE, SlideOptions
from .reader import open_slide
from .run import _make_runner, run_slide

__all__ = ['PROG', 'build_parser', 'add_slide_options', 'slide_options_from_args', 'main']

PROG = 'python -m timm_inception_pcam.slide'


def build_parser() -> argparse.ArgumentParser:
    from ..checkpoint import ModelKwargsAction
    from ..inference import BACKENDS

    p = ArgumentParser(prog=PROG, description=__doc__.split('\n')[0])
    p.add_argument('slide', metavar='SLIDE', help='whole-slide image (tiled/pyramidal TIFF, SVS, NDPI, MRXS, ...)')
    p.add_argument('--model', default=None, help='registered model name (default: the checkpoint\'s arch)')
    p.add_argument('--checkpoint', default=None,
                   help='PyTorch checkpoint / .safetensors / hf-hub:org/name, an .onnx model, or a TensorRT .plan')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ModelKwargsAction, help='extra model arguments')
    p.add_argument('--use-ema', action='store_true', help='the checkpoint\'s EMA weights')
    p.add_argument('--backend', default='auto', choices=('auto', *BACKENDS),
                   help='auto: the fastest CPU path (inference layer); tensorrt: a .plan on an NVIDIA GPU')
    p.add_argument('--out', '--output', dest='out', required=True, help='output folder for this slide')
    add_slide_options(p)
    p.add_argument('--resume', action='store_true', help='continue from <out>/progress.npz (same settings)')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    return p


def add_slide_options(p: argparse.ArgumentParser) -> None:
    """The options of `SlideOptions` (shared by the slide and cohort commands)."""
    p.add_argument('--mpp', type=float, default=None, help='level-0 um/px, overriding the slide metadata')
    p.add_argument('--target-mpp', type=float, default=PCAM_MPP, help='tile resolution (PCam: 0.972 um/px)')
    p.add_argument('--mpp-tolerance', type=float, default=0.1,
                   help='relative distance within which a pyramid level is used without resampling')
    p.add_argument('--stride', type=int, default=TILE, help='tile stride in pixels at the tile resolution')
    p.add_argument('-b', '--batch-size', type=int, default=64)
    p.add_argument('--tissue-threshold', type=float, default=0.07, help='HSV saturation of tissue pixels')
    p.add_argument('--min-tissue', type=float, default=0.25, help='fraction of tissue pixels a tile needs')
    p.add_argument('--threshold', type=float, default=0.5, help='probability listed in tiles.csv/.geojson')
    p.add_argument('--save-every', type=float, default=30.0, help='seconds between progress saves')
    p.add_argument('--thumbnail-size', type=int, default=2048, help='longer side of the heatmap background')


def slide_options_from_args(args: argparse.Namespace) -> SlideOptions:
    """`SlideOptions` from the parsed `add_slide_options` arguments, range-checked."""
    return SlideOptions(target_mpp=args.target_mpp, mpp=args.mpp, mpp_tolerance=args.mpp_tolerance,
                        stride=args.stride, batch_size=args.batch_size, tissue_threshold=args.tissue_threshold,
                        min_tissue=args.min_tissue, threshold=args.threshold, save_every=args.save_every,
                        thumbnail_size=args.thumbnail_size).check()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run whole-slide inference; returns the summary (also written to <out>/summary.json)."""
    args = build_parser().parse_args(argv)
    options = slide_options_from_args(args)
    slide = open_slide(args.slide)  # a bad slide fails before any model is loaded
    with ExitStack() as stack:
        stack.callback(slide.close)
        plan_grid(slide, options)  # and so do a slide without a resolution and an absurd grid
        predict, info = _make_runner(stack, args.model, args.checkpoint, args.backend, args.batch_size,
                                     args.use_ema, args.model_kwargs, thresholds=tuple({0.5, options.threshold}))
        return run_slide(slide, predict, args.out, options, resume=args.resume, run_info=info,
                         progress=False if args.no_progress else None)
