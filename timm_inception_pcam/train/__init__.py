"""Train a PCam classifier from the official HDF5 files with timm's library parts.

    python -m timm_inception_pcam.train --model inception_v4_pcam --data-dir DIR --output DIR [--epochs N ...]
    torchrun --nproc-per-node 2 -m timm_inception_pcam.train ...        # DDP, one process per device

From Python: `train(TrainConfig(data_dir=..., output=..., ...))` returns a `TrainResult`; messages go to the
`timm_inception_pcam.train` logger (tqdm draws the progress bars). Model, optimizer, scheduler, EMA, loss, AMP
scaler and gradient clipping come from timm; the data come from `timm_inception_pcam.data.PCamDataset` with the PCam
augmentations (no conversion to image files). Every epoch writes `last.pth` (the whole training state, for
`--resume`), `model_best.pth` when validation ROC AUC improves (the weights, EMA or not, that scored it) and
`log.csv` / `log.json`, all atomically. One run at a time owns the output folder (`storage.claim_output_dir`).
"""
from collections.abc import Sequence

from ..errors import cli as _cli
from .checkpointing import capture_rng_state, restore_rng_state, seed_everything
from .config import (
    BEST_NAME,
    LAST_NAME,
    LOG_CSV,
    LOG_JSON,
    TrainConfig,
    TrainError,
    TrainResult,
    build_parser,
    config_from_args,
)
from .core import build_optimization, train
from .loop import predict, train_one_epoch, validation_metrics

__all__ = ['TrainConfig', 'TrainResult', 'TrainError', 'train', 'main', 'cli', 'build_parser', 'config_from_args',
           'build_optimization', 'train_one_epoch', 'predict', 'validation_metrics', 'capture_rng_state',
           'restore_rng_state', 'seed_everything', 'LAST_NAME', 'BEST_NAME', 'LOG_CSV', 'LOG_JSON']


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """The command: parse `argv` into a TrainConfig and train."""
    return train(config_from_args(argv))


def cli(argv: Sequence[str] | None = None) -> int:
    """`main` with user errors as one line on stderr and exit status 2."""
    return _cli(main, 'train', argv)
