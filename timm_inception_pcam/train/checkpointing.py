"""What a run saves after every epoch and restores on `--resume`: weights, EMA, optimizer, schedule, scaler, RNG
states and history (`last.pth`), the best weights (`model_best.pth`) and the logs, all atomically."""
from __future__ import annotations

import csv
import io
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from timm.utils import ModelEmaV3, NativeScaler

from ..checkpoint import save_checkpoint
from ..storage import atomic_path, atomic_write_json
from .config import BEST_NAME, LAST_NAME, LOG_CSV, LOG_JSON, TrainConfig, TrainError

__all__ = ['RunState', 'seed_everything', 'capture_rng_state', 'restore_rng_state', 'check_resume', 'TRAIN_STATE']

_logger = logging.getLogger(__name__)

# checkpoint 'train_state': what kind of trainer file it is (both have 'format' == checkpoint.CHECKPOINT_FORMAT)
TRAIN_STATE = {'last': 'last', 'best': 'best'}
# Options that shape the run after its start: a resume that changes them continues a different run (allowed, with
# a notice). The schedule is re-planned when one of _SCHEDULE changes.
_SCHEDULE = ('epochs', 'lr', 'sched', 'sched_on_updates', 'warmup_epochs', 'warmup_lr', 'min_lr', 'decay_epochs',
             'decay_rate', 'batch_size', 'steps_per_epoch', 'limit_train')
_RUN_ARGS = (*_SCHEDULE, 'opt', 'opt_eps', 'opt_betas', 'momentum', 'weight_decay', 'clip_grad', 'clip_mode',
             'smoothing', 'drop', 'drop_path', 'model_ema_decay', 'seed', 'precision', 'limit_val', 'train_split',
             'val_split', 'aux_weight')


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and numbers (loadable with weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        'python': torch.tensor(py_state, dtype=torch.int64), 'python_version': py_version, 'python_gauss': py_gauss,
        'numpy_keys': torch.from_numpy(np_keys.astype(np.int64)), 'numpy_pos': int(np_pos),
        'numpy_has_gauss': int(np_has_gauss), 'numpy_cached_gaussian': float(np_cached),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state['python_version'], tuple(int(v) for v in state['python'].tolist()), state['python_gauss']))
    np.random.set_state(('MT19937', state['numpy_keys'].numpy().astype(np.uint32), state['numpy_pos'],
                         state['numpy_has_gauss'], state['numpy_cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def check_resume(ckpt: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    """Refuse a `--resume` state (`read_resume`'s) that trains another model than `cfg`."""
    saved = ckpt.get('train_args', {})
    if saved.get('model', '').split('.')[0] != cfg.model.split('.')[0]:
        raise TrainError(f'--resume {path}: the checkpoint trains {saved.get("model")!r}, not --model {cfg.model!r}')
    if saved.get('num_classes') != cfg.num_classes:
        raise TrainError(f'--resume {path}: the checkpoint has {saved.get("num_classes")} classes, '
                         f'--num-classes is {cfg.num_classes}')
    ours = cfg.record()
    was = float(saved.get('aux_weight') or 0)
    if (was > 0) != (cfg.aux_weight > 0):  # the auxiliary classifiers' weights are in last.pth or not
        raise TrainError(f'--resume {path}: the run was trained with --aux-weight {was:g}; resume it with '
                         f'{"an --aux-weight above 0" if was > 0 else "--aux-weight 0"} (the auxiliary classifiers '
                         f'are {"part" if was > 0 else "not part"} of its state)')
    if saved.get('model_kwargs') != ours['model_kwargs']:
        raise TrainError(f'--resume {path}: the checkpoint was built with --model-kwargs {saved.get("model_kwargs")}, '
                         f'not {ours["model_kwargs"]}')


@dataclass
class RunState:
    """Everything `last.pth` holds besides the configuration, as the epoch loop updates it."""
    model: nn.Module  # unwrapped (not DDP)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: ModelEmaV3 | None
    scaler: NativeScaler | None
    arch: str
    model_kwargs: dict[str, Any]
    num_updates: int = 0
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float = -math.inf
    best_epoch: int = -1
    data_provenance: str = 'unknown'  # 'synthetic' | 'pcam' | 'unknown' (data.provenance): in every checkpoint

    def restore(self, ckpt: dict[str, Any], cfg: TrainConfig, rank: int, world: int) -> None:
        """Load a checked `last.pth` (see `check_resume`) into this state, the RNGs and the LR schedule."""
        self.model.load_state_dict(ckpt['state_dict'])
        if self.ema is not None:
            if 'state_dict_ema' not in ckpt:
                raise TrainError(f'--resume {cfg.resume}: the run was trained without EMA; pass --no-model-ema')
            self.ema.module.load_state_dict(ckpt['state_dict_ema'])
        elif 'state_dict_ema' in ckpt:
            raise TrainError(f'--resume {cfg.resume}: the run was trained with EMA; drop --no-model-ema')
        self.optimizer.load_state_dict(ckpt['optimizer'])
        saved, ours = ckpt.get('train_args', {}), cfg.record()
        changed = [k for k in _RUN_ARGS if k in saved and saved[k] != ours[k]]
        if changed and rank == 0:
            _logger.info('notice: resuming with changed arguments, the run will differ from an uninterrupted one: %s',
                         ', '.join(f'{k} {saved[k]} -> {ours[k]}' for k in changed))
        if self.scheduler is not None:
            if ckpt.get('scheduler') is not None and not set(changed) & set(_SCHEDULE):
                self.scheduler.load_state_dict(ckpt['scheduler'])
            # timm schedulers are functions of the step count: put the lr where this schedule has it now
            if cfg.sched_on_updates:
                self.scheduler.step_update(num_updates=int(ckpt['num_updates']))
            else:
                self.scheduler.step(int(ckpt['epoch']) + 1)
        if self.scaler is not None and ckpt.get('scaler') is not None:
            self.scaler.load_state_dict(ckpt['scaler'])
        self.start_epoch, self.num_updates = int(ckpt['epoch']) + 1, int(ckpt['num_updates'])
        self.history = list(ckpt.get('history', []))
        self.best_metric = float(ckpt.get('best_metric', -math.inf))
        self.best_epoch = int(ckpt.get('best_epoch', -1))
        rng = ckpt.get('rng_states') or []
        if len(rng) == world:
            restore_rng_state(rng[rank])
        else:
            if rank == 0:
                _logger.info('notice: the checkpoint holds RNG states of %d processes, this run has %d: reseeding',
                             len(rng), world)
            seed_everything(cfg.seed + rank + 7919 * self.start_epoch)

    def save(self, cfg: TrainConfig, out_dir: Path, epoch: int, rng_states: list[dict[str, Any]],
             best: tuple[nn.Module, str] | None) -> None:
        """Write model_best.pth first (when `best` = (weights, 'model' or 'ema')), then last.pth, then the logs: a
        kill between any two leaves a consistent run (resuming from last.pth repeats at most the current epoch)."""
        metrics = {k: v for k, v in self.history[-1].items() if isinstance(v, (int, float)) and v is not None}
        if best is not None:
            net, tag = best
            # no auxiliary classifiers (training-only): timm's scripts load the file strictly into the plain model
            save_checkpoint(out_dir / BEST_NAME, net, arch=self.arch, model_kwargs=self.model_kwargs,
                            aux_heads=False, epoch=epoch, metrics=metrics, weights=tag, best_metric=self.best_metric,
                            selection='val_roc_auc', train_state=TRAIN_STATE['best'],
                            data_provenance=self.data_provenance, train_args=cfg.record())
        extra: dict[str, Any] = {
            'train_state': TRAIN_STATE['last'], 'epoch': epoch, 'num_updates': self.num_updates, 'metrics': metrics,
            'data_provenance': self.data_provenance,
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict() if self.scheduler is not None else None,
            'scaler': self.scaler.state_dict() if self.scaler is not None else None, 'history': self.history,
            'best_metric': self.best_metric, 'best_epoch': self.best_epoch, 'rng_states': rng_states,
            'train_args': cfg.record(),
        }
        if self.ema is not None:
            extra['state_dict_ema'] = self.ema.module.state_dict()
        save_checkpoint(out_dir / LAST_NAME, self.model, arch=self.arch, model_kwargs=self.model_kwargs, **extra)
        write_logs(out_dir, self.history)


def write_logs(out_dir: Path, history: list[dict[str, Any]]) -> None:
    """log.json and log.csv: one row per epoch."""
    atomic_write_json(out_dir / LOG_JSON, history)
    fields = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator='\n')
    writer.writeheader()
    writer.writerows(history)
    with atomic_path(out_dir / LOG_CSV) as tmp:
        tmp.write_text(buf.getvalue())
