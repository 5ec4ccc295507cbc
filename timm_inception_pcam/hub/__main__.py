"""`python -m timm_inception_pcam.hub` (also `python -m timm_inception_pcam.publish`): publish to the Hub."""
import sys

from ..errors import cli
from .cli import main

if __name__ == '__main__':
    sys.exit(cli(main, 'publish'))
