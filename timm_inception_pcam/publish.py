"""`python -m timm_inception_pcam.publish`: the Hub command at its documented name; the code is in `hub/`."""
import sys

from .errors import cli
from .hub.cli import main

__all__ = ['main']

if __name__ == '__main__':
    sys.exit(cli(main, 'publish'))
