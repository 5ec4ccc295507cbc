"""`python -m timm_inception_pcam.slide`: the whole-slide command at its documented name; the code is in `wsi/`.

The names below stay importable from here for existing callers (benchmarks/slide.py); new code imports `wsi`.
"""
import sys

from .data.synth_slide import write_synthetic_slide
from .errors import cli
from .wsi import SlideError, SlideOptions, open_slide, run_slide
from .wsi.cli import main

__all__ = ['SlideError', 'SlideOptions', 'open_slide', 'run_slide', 'write_synthetic_slide', 'main']

if __name__ == '__main__':
    sys.exit(cli(main, 'slide'))
