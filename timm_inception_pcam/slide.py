"""`python -m timm_inception_pcam.slide`: the whole-slide command at its documented name; the code is in `wsi/`."""
import sys

from .errors import cli
from .wsi.cli import main

if __name__ == '__main__':
    sys.exit(cli(main, 'slide'))
