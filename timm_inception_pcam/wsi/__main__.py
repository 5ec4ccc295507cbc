"""`python -m timm_inception_pcam.wsi` (also `python -m timm_inception_pcam.slide`): whole-slide inference."""
import sys

from ..errors import cli
from .cli import main

if __name__ == '__main__':
    sys.exit(cli(main, 'slide'))
