"""What a training run is asked to do (`TrainConfig`), what it returns (`TrainResult`), and the command line that
fills a `TrainConfig`."""
from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import CHECKPOINT_FORMAT, ModelKwargsAction, read_checkpoint
from ..constants import MAX_SEED, MAX_WORKERS, PCAM_NUM_CLASSES
from ..errors import ArgumentParser, PCamError, check_range
from ..precision import AUTOCAST_PRECISIONS, parse_precision

__all__ = ['TrainConfig', 'TrainResult', 'TrainError', 'build_parser', 'config_from_args', 'LAST_NAME', 'BEST_NAME',
           'LOG_CSV', 'LOG_JSON']

LAST_NAME = 'last.pth'
BEST_NAME = 'model_best.pth'
LOG_CSV = 'log.csv'
LOG_JSON = 'log.json'
# --amp-dtype keeps its old spellings; the config holds the canonical name (precision.py)
_AMP_SPELLINGS = (*AUTOCAST_PRECISIONS, 'float32', 'bfloat16', 'float16')


class TrainError(PCamError, RuntimeError):
    """A training run cannot start or continue; the message says what to change."""


@dataclass
class TrainConfig:
    """Every choice of a training run; the command line's options under the same names (`--model-kwargs` ->
    `model_kwargs`, `--amp-dtype` -> `precision`). Constructing one checks ranges (UsageError)."""
    data_dir: Path
    output: Path | None = None  # default: the folder of `resume`
    # data
    train_split: str = 'train'
    val_split: str = 'valid'
    limit_train: int | None = None
    limit_val: int | None = None
    in_memory: bool = False
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    # model
    model: str = 'inception_v4_pcam'
    pretrained: bool = True
    initial_checkpoint: Path | None = None
    num_classes: int = PCAM_NUM_CLASSES
    drop: float | None = None
    drop_path: float | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = True
    # optimisation
    opt: str = 'adamw'
    lr: float = 1e-3
    opt_eps: float | None = None
    opt_betas: tuple[float, ...] | None = None
    momentum: float = 0.9
    weight_decay: float = 0.05
    clip_grad: float = 1.0
    clip_mode: str = 'norm'
    smoothing: float = 0.1
    aux_weight: float = 0.0  # > 0: auxiliary classifiers on, their losses added with this weight each
    sched: str = 'cosine'
    sched_on_updates: bool = True
    epochs: int = 10
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    decay_epochs: float | None = None
    decay_rate: float = 0.1
    batch_size: int = 128
    validation_batch_size: int | None = None
    steps_per_epoch: int | None = None
    model_ema: bool = True
    model_ema_decay: float = 0.9998
    # device and run
    device: str | None = None  # None: cuda when available, else cpu
    precision: str = 'auto'
    seed: int = 42
    resume: Path | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        for name in ('output', 'initial_checkpoint', 'resume'):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
        self.precision = parse_precision(self.precision, name='--amp-dtype')
        self.model_kwargs = dict(self.model_kwargs)
        if self.opt_betas is not None:
            self.opt_betas = tuple(self.opt_betas)
        for name, low in (('epochs', 1), ('batch_size', 1), ('validation_batch_size', 1), ('steps_per_epoch', 1),
                          ('limit_train', 1), ('limit_val', 1), ('num_classes', 2),
                          ('warmup_epochs', 0), ('clip_grad', 0), ('weight_decay', 0), ('momentum', 0)):
            check_range(_option(name), getattr(self, name), low)
        check_range(_option('workers'), self.workers, 0, MAX_WORKERS)
        check_range('--seed', self.seed, 0, MAX_SEED)
        check_range('--lr', self.lr, 0, low_open=True)
        check_range('--min-lr', self.min_lr, 0)
        check_range('--decay-epochs', self.decay_epochs, 0, low_open=True)
        check_range('--decay-rate', self.decay_rate, 0, 1, low_open=True)  # <= 0: a zero or negative lr
        if self.min_lr > self.lr:
            raise TrainError(f'--min-lr {self.min_lr:g} is above --lr {self.lr:g}: the schedule would raise the '
                             f'learning rate (lower --min-lr)')
        check_range('--smoothing', self.smoothing, 0, 1)
        check_range('--aux-weight', self.aux_weight, 0, 10)
        check_range('--model-ema-decay', self.model_ema_decay, 0, 1)
        for name in ('drop', 'drop_path'):
            check_range(_option(name), getattr(self, name), 0, 1)
        if 'num_classes' in self.model_kwargs:
            raise TrainError(f'--model-kwargs num_classes={self.model_kwargs["num_classes"]}: the class count is '
                             f'--num-classes (default {PCAM_NUM_CLASSES})')
        if self.resume is not None and self.overwrite:
            raise TrainError('--resume and --overwrite contradict each other: continue the run or replace it')

    @property
    def run_dir(self) -> Path:
        """The run folder: `output`, or the folder of `resume`."""
        if self.output is not None:
            return self.output
        if self.resume is None:
            raise TrainError('--output is required (the run folder) unless --resume names a checkpoint in one')
        return self.resume.parent

    def record(self) -> dict[str, Any]:
        """The configuration as plain data (stored in checkpoints, which must load with weights_only=True)."""
        out: dict[str, Any] = {}
        for k, v in dataclasses.asdict(self).items():
            if isinstance(v, (str, int, float, bool)) or v is None:
                out[k] = v
            elif isinstance(v, dict):
                out[k] = {str(a): list(b) if isinstance(b, tuple) else b for a, b in v.items()}
            elif isinstance(v, (list, tuple)):
                out[k] = list(v)
            elif k == 'data_dir':  # absolute: a resume from another working directory finds it
                out[k] = os.path.abspath(v)
            else:
                out[k] = str(v)
        return out


@dataclass
class TrainResult:
    """What a finished run produced: its files, its best validation ROC AUC and one history row per epoch."""
    output: Path
    last_checkpoint: Path
    best_checkpoint: Path | None  # None when no epoch had a defined ROC AUC
    best_metric: float | None
    best_epoch: int
    history: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


def _option(name: str) -> str:
    return '--' + name.replace('_', '-')


def _default(name: str) -> Any:
    f = TrainConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m timm_inception_pcam.train`; defaults are TrainConfig's."""
    from . import __doc__ as doc

    d = _default
    p = ArgumentParser(prog='python -m timm_inception_pcam.train', description=(doc or '').split('\n')[0])
    g = p.add_argument_group('data')
    g.add_argument('--data-dir', default=None,
                   help='folder with the official camelyonpatch_level_2_split_* files (with --resume: the run\'s own)')
    g.add_argument('--train-split', default=d('train_split'))
    g.add_argument('--val-split', default=d('val_split'))
    g.add_argument('--limit-train', type=int, default=None, metavar='N', help='train on a seeded random N patches')
    g.add_argument('--limit-val', type=int, default=None, metavar='N', help='validate on a seeded random N patches')
    g.add_argument('--in-memory', action='store_true', help='read the HDF5 arrays into memory once')
    g.add_argument('-j', '--workers', type=int, default=d('workers'), help='DataLoader workers')

    g = p.add_argument_group('model')
    g.add_argument('--model', default=d('model'), help='registered timm model name, optionally .tag')
    g.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=d('pretrained'),
                   help='fine-tune from the model\'s default pretrained tag (ImageNet: tf_in1k, tv_in1k for '
                        'GoogLeNet / Inception-v3 / VGG16); random init with a notice if the weights cannot be had '
                        '(set HF_HUB_OFFLINE=1 to skip the download attempt)')
    g.add_argument('--initial-checkpoint', default=None, metavar='PATH',
                   help='start from these weights (and, unless --model-kwargs says otherwise, their architecture)')
    g.add_argument('--num-classes', type=int, default=d('num_classes'))
    g.add_argument('--drop', type=float, default=None, help='dropout before the classifier (model default if unset)')
    g.add_argument('--drop-path', type=float, default=None, help='stochastic depth (model default if unset)')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ModelKwargsAction,
                   help='extra create_model kwargs, e.g. depths=1,1,1')
    g.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=d('channels_last'))

    g = p.add_argument_group('optimisation')
    g.add_argument('--opt', default=d('opt'), help="timm optimizer name; 'rmsproptf' is the paper's RMSProp")
    g.add_argument('--lr', type=float, default=d('lr'))
    g.add_argument('--opt-eps', type=float, default=None, help='optimizer epsilon (the paper: 1.0 with rmsproptf)')
    g.add_argument('--opt-betas', type=float, nargs='+', default=None)
    g.add_argument('--momentum', type=float, default=d('momentum'))
    g.add_argument('--weight-decay', type=float, default=d('weight_decay'))
    g.add_argument('--clip-grad', type=float, default=d('clip_grad'), help='gradient clipping value; 0 disables')
    g.add_argument('--clip-mode', default=d('clip_mode'), choices=('norm', 'value', 'agc'))
    g.add_argument('--smoothing', type=float, default=d('smoothing'), help='label smoothing')
    g.add_argument('--aux-weight', type=float, default=d('aux_weight'),
                   help='turn on the auxiliary classifiers (GoogLeNet, Inception-v3) and add their losses with this '
                        'weight each (0.3 in the GoogLeNet paper); training only: checkpoints evaluate and export '
                        'without them')
    g.add_argument('--sched', default=d('sched'), help="timm scheduler name ('cosine', 'step', ...)")
    g.add_argument('--sched-on-updates', action=argparse.BooleanOptionalAction, default=d('sched_on_updates'),
                   help='step the schedule after every update rather than every epoch')
    g.add_argument('--epochs', type=int, default=d('epochs'))
    g.add_argument('--warmup-epochs', type=float, default=d('warmup_epochs'))
    g.add_argument('--warmup-lr', type=float, default=d('warmup_lr'))
    g.add_argument('--min-lr', type=float, default=d('min_lr'))
    g.add_argument('--decay-epochs', type=float, default=None, help="interval of 'step' schedules")
    g.add_argument('--decay-rate', type=float, default=d('decay_rate'))
    g.add_argument('-b', '--batch-size', type=int, default=d('batch_size'), help='per process')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None)
    g.add_argument('--steps-per-epoch', type=int, default=None, metavar='N', help='cap the updates of an epoch')
    g.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=d('model_ema'))
    g.add_argument('--model-ema-decay', type=float, default=d('model_ema_decay'))

    g = p.add_argument_group('device and run')
    g.add_argument('--device', default=None, help='torch device (default: cuda when available, else cpu)')
    g.add_argument('--amp-dtype', dest='precision', default=d('precision'), choices=_AMP_SPELLINGS,
                   help='autocast precision (float32 / bfloat16 / float16 are accepted for fp32 / bf16 / fp16); '
                        'auto = bf16 on CPUs with AMX or AVX-512 BF16 and GPUs that support it, fp16 on older '
                        'GPUs, fp32 (no autocast) otherwise')
    g.add_argument('--seed', type=int, default=d('seed'))
    g.add_argument('--output', default=None, help='run folder (default: the folder of --resume)')
    g.add_argument('--resume', default=None, metavar='PATH',
                   help=f'continue from this {LAST_NAME}, with the run\'s own options for those not given')
    g.add_argument('--overwrite', action='store_true', help='replace the run already in --output')
    g.add_argument('--progress', action=argparse.BooleanOptionalAction, default=d('progress'),
                   help='tqdm progress bars')
    return p


# Where and how this process runs, not what the run is: never taken from the resumed run.
_NOT_RESUMED = frozenset({'resume', 'output', 'overwrite', 'progress', 'device', 'workers', 'in_memory'})


def config_from_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse a command line into a TrainConfig. With --resume, an option not given is the run's own (its last.pth
    records them), so `--resume RUN/last.pth` alone continues the run as it was started."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume is not None:
        given = _given_options(argv)
        recorded = read_resume(Path(args.resume)).get('train_args')
        recorded = dict(recorded) if isinstance(recorded, dict) else {}
        for name, value in recorded.items():
            if name not in given and name not in _NOT_RESUMED and hasattr(args, name):
                setattr(args, name, value)
        if 'data_dir' not in given and args.data_dir is not None and not Path(args.data_dir).is_dir():
            raise TrainError(f'--resume {args.resume}: the run\'s data folder {args.data_dir} is not there any more; '
                             f'pass --data-dir')
        if args.data_dir is None:
            raise TrainError(f'--resume {args.resume}: records no data folder; pass --data-dir')
    if args.data_dir is None:
        parser.error('the following arguments are required: --data-dir (or --resume with a run that records it)')
    return TrainConfig(**vars(args))


def _given_options(argv: Sequence[str] | None) -> set[str]:
    """The destinations the command line sets explicitly (a parse with every default suppressed)."""
    quiet = build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


def read_resume(path: Path) -> dict[str, Any]:
    """The training state --resume names, read: TrainError for a folder, a missing file or another kind of checkpoint
    (CheckpointError if unreadable)."""
    if path.is_dir():
        raise TrainError(f'--resume {path}: a folder, expected a checkpoint file (e.g. {path / LAST_NAME})')
    if not path.is_file():
        raise TrainError(f'--resume {path}: no such file')
    from .checkpointing import TRAIN_STATE  # checkpointing imports this module

    ckpt = read_checkpoint(path)
    if ckpt.get('format') != CHECKPOINT_FORMAT or ckpt.get('train_state') != TRAIN_STATE['last'] \
            or 'optimizer' not in ckpt:
        raise TrainError(f'--resume {path}: not a training state written by this trainer (format '
                         f'{ckpt.get("format")!r}, train_state {ckpt.get("train_state")!r}; expected '
                         f'{CHECKPOINT_FORMAT!r}, {TRAIN_STATE["last"]!r}: the run\'s {LAST_NAME}); use '
                         f'--initial-checkpoint to start a new run from its weights')
    return ckpt
