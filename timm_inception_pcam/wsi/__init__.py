"""Whole-slide inference, by concern: reading (reader), tiles and tissue (grid), the loop (run), outputs, CLI.

`python -m timm_inception_pcam.slide` (or `.wsi`) runs the command; `run_slide` is the same loop as a function.
The synthetic slide writer for tests and benchmarks is `timm_inception_pcam.data.synth_slide`.
"""
from .grid import TileGrid, choose_level, plan_grid, read_row, tissue_fractions
from .options import PCAM_MPP, TILE, SlideOptions
from .outputs import FILES, write_outputs
from .reader import SlideError, WholeSlide, open_slide
from .run import SUMMARY_FORMAT, Predictor, run_slide, saved_run

__all__ = ['PCAM_MPP', 'TILE', 'FILES', 'SUMMARY_FORMAT', 'Predictor', 'SlideError', 'SlideOptions', 'TileGrid',
           'WholeSlide', 'open_slide', 'choose_level', 'plan_grid', 'read_row', 'tissue_fractions', 'run_slide',
           'saved_run', 'write_outputs']
