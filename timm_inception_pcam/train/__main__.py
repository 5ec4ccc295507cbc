"""`python -m timm_inception_pcam.train` and `torchrun -m timm_inception_pcam.train`."""
import sys

from timm_inception_pcam.errors import cli
from timm_inception_pcam.train import main

if __name__ == '__main__':
    sys.exit(cli(main, 'train'))
