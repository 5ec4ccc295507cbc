"""Train a PCam classifier from the official HDF5 files with timm's library parts.

    python -m timm_inception_pcam.train --model inception_v4_pcam --data-dir DIR --output DIR [--epochs N ...]
    torchrun --nproc-per-node 2 -m timm_inception_pcam.train ...        # DDP, one process per device

Model, optimizer, scheduler, EMA, loss, AMP scaler and gradient clipping come from timm; the data come from
`timm_inception_pcam.data.PCamDataset` with the PCam augmentations (no conversion to image files). Every epoch
writes `last.pth` (the whole training state, for `--resume`), `model_best.pth` when validation ROC AUC improves
(the weights, EMA or not, that scored it) and `log.csv` / `log.json`, all atomically.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import random
import socket
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, ParseKwargs, dispatch_clip_grad
from timm.utils.distributed import init_distributed_device_so
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from tqdm import tqdm

from .constants import PCAM_NUM_CLASSES
from .device import cpu_has_amx
from .errors import PCamError
from .storage import atomic_path, atomic_write_json

__all__ = ['TrainError', 'build_parser', 'build_optimization', 'main', 'amp_dtype_for', 'cpu_has_amx']

LAST_NAME = 'last.pth'
BEST_NAME = 'model_best.pth'
LOG_CSV = 'log.csv'
LOG_JSON = 'log.json'
CHECKPOINT_FORMAT = 'timm-inception-pcam-train/1'
# Arguments that shape the run after its start: a resume that changes them continues a different run (allowed, with
# a notice). The schedule is re-planned when one of _SCHEDULE changes.
_SCHEDULE = ('epochs', 'lr', 'sched', 'sched_on_updates', 'warmup_epochs', 'warmup_lr', 'min_lr', 'decay_epochs',
             'decay_rate', 'batch_size', 'steps_per_epoch', 'limit_train')
_RUN_ARGS = (*_SCHEDULE, 'opt', 'opt_eps', 'opt_betas', 'momentum', 'weight_decay', 'clip_grad', 'clip_mode',
             'smoothing', 'drop', 'drop_path', 'model_ema_decay', 'seed', 'amp_dtype', 'limit_val', 'train_split',
             'val_split')


class TrainError(PCamError, RuntimeError):
    """A training run cannot start or continue; the message says what to change."""


# ----------------------------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m timm_inception_pcam.train', description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('data')
    g.add_argument('--data-dir', required=True, help='folder with the official camelyonpatch_level_2_split_* files')
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='valid')
    g.add_argument('--limit-train', type=int, default=None, metavar='N', help='train on a seeded random N patches')
    g.add_argument('--limit-val', type=int, default=None, metavar='N', help='validate on a seeded random N patches')
    g.add_argument('--in-memory', action='store_true', help='read the HDF5 arrays into memory once')
    g.add_argument('-j', '--workers', type=int, default=min(4, os.cpu_count() or 1), help='DataLoader workers')

    g = p.add_argument_group('model')
    g.add_argument('--model', default='inception_v4_pcam', help='registered timm model name, optionally .tag')
    g.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=True,
                   help='fine-tune from the model\'s pretrained tag (tf_in1k); random init with a notice if the '
                        'weights cannot be had')
    g.add_argument('--initial-checkpoint', default=None, metavar='PATH', help='start from these weights')
    g.add_argument('--num-classes', type=int, default=PCAM_NUM_CLASSES)
    g.add_argument('--drop', type=float, default=None, help='dropout before the classifier (model default if unset)')
    g.add_argument('--drop-path', type=float, default=None, help='stochastic depth (model default if unset)')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='extra create_model kwargs, e.g. depths=1,1,1')
    g.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=True)

    g = p.add_argument_group('optimisation')
    g.add_argument('--opt', default='adamw', help="timm optimizer name; 'rmsproptf' is the paper's RMSProp")
    g.add_argument('--lr', type=float, default=1e-3)
    g.add_argument('--opt-eps', type=float, default=None, help='optimizer epsilon (the paper: 1.0 with rmsproptf)')
    g.add_argument('--opt-betas', type=float, nargs='+', default=None)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=0.05)
    g.add_argument('--clip-grad', type=float, default=1.0, help='gradient clipping value; 0 disables')
    g.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'))
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--sched', default='cosine', help="timm scheduler name ('cosine', 'step', ...)")
    g.add_argument('--sched-on-updates', action=argparse.BooleanOptionalAction, default=True,
                   help='step the schedule after every update rather than every epoch')
    g.add_argument('--epochs', type=int, default=10)
    g.add_argument('--warmup-epochs', type=float, default=1.0)
    g.add_argument('--warmup-lr', type=float, default=1e-6)
    g.add_argument('--min-lr', type=float, default=1e-6)
    g.add_argument('--decay-epochs', type=float, default=None, help="interval of 'step' schedules")
    g.add_argument('--decay-rate', type=float, default=0.1)
    g.add_argument('-b', '--batch-size', type=int, default=128, help='per process')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None)
    g.add_argument('--steps-per-epoch', type=int, default=None, metavar='N', help='cap the updates of an epoch')
    g.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=True)
    g.add_argument('--model-ema-decay', type=float, default=0.9998)

    g = p.add_argument_group('device and run')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    g.add_argument('--amp-dtype', default='auto', choices=('auto', 'bfloat16', 'float16', 'float32'),
                   help='autocast dtype; auto = bf16 on CPUs with AMX and GPUs that support it, fp16 on older '
                        'GPUs, float32 (no autocast) otherwise')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--output', default=None, help='run folder (default: the folder of --resume)')
    g.add_argument('--resume', default=None, metavar='PATH', help=f'continue from this {LAST_NAME}')
    g.add_argument('--progress', action=argparse.BooleanOptionalAction, default=True, help='tqdm progress bars')
    return p


# ----------------------------------------------------------------------------------------------- device & RNG


def amp_dtype_for(device: torch.device, requested: str = 'auto') -> torch.dtype | None:
    """Autocast dtype for `device`: None means float32 without autocast."""
    if requested == 'float32':
        return None
    if requested != 'auto':
        return getattr(torch, requested)
    if device.type == 'cuda':
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == 'cpu':
        return torch.bfloat16 if cpu_has_amx() else None
    return None


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


# ----------------------------------------------------------------------------------------------- data


class _EpochSampler(Sampler[int]):
    """Shuffle with a generator seeded by (seed, epoch): the order of an epoch does not depend on what ran before."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + 1_000_003 * self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _limit(dataset: Dataset, limit: int | None, seed: int, what: str) -> Dataset:
    n = len(dataset)
    if limit is None or limit >= n:
        return dataset
    if limit < 1:
        raise TrainError(f'--limit-{what} must be at least 1, got {limit}')
    g = torch.Generator()
    g.manual_seed(seed)
    return Subset(dataset, torch.randperm(n, generator=g)[:limit].sort().values.tolist())


def build_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset]:
    from .data import PCamDataset, create_pcam_transform

    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise TrainError(f'--data-dir {data_dir}: no such folder (expected the official PCam HDF5 files)')
    train = PCamDataset(data_dir, args.train_split, transform=create_pcam_transform(is_training=True),
                        in_memory=args.in_memory)
    val = PCamDataset(data_dir, args.val_split, transform=create_pcam_transform(is_training=False),
                      in_memory=args.in_memory)
    return _limit(train, args.limit_train, args.seed, 'train'), _limit(val, args.limit_val, args.seed + 1, 'val')


def _labels_of(dataset: Dataset) -> np.ndarray:
    if isinstance(dataset, Subset):
        return np.asarray(_labels_of(dataset.dataset))[np.asarray(dataset.indices)]
    return np.asarray(dataset.labels)


# ----------------------------------------------------------------------------------------------- model


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The create_model keyword arguments that define the architecture (stored in every checkpoint)."""
    kwargs: dict[str, Any] = {'num_classes': args.num_classes}
    if args.drop is not None:
        kwargs['drop_rate'] = args.drop
    if args.drop_path is not None:
        kwargs['drop_path_rate'] = args.drop_path
    kwargs.update(args.model_kwargs)
    return kwargs


def pretrained_source(name: str, timeout: float = 3.0) -> tuple[bool, str]:
    """Can pretrained weights for `name` be had without waiting on retries? Returns (available, where or why not).

    Looks in the configured file and the Hugging Face cache first; otherwise the hub must answer a TCP connect
    within `timeout` seconds (huggingface_hub would spend about a minute retrying an unreachable host).
    """
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None or not (cfg.file or cfg.hf_hub_id or cfg.url):
        return False, f'no pretrained weights are registered for {name}'
    tag = f"{name.split('.')[0]}.{cfg.tag}" if cfg.tag else name
    if cfg.file:
        return (True, str(cfg.file)) if Path(cfg.file).is_file() else (False, f'{cfg.file} does not exist')
    host = 'huggingface.co'
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo_id = cfg.hf_hub_id.split('@')[0]
        for filename in ('model.safetensors', 'pytorch_model.bin'):
            cached = try_to_load_from_cache(repo_id, filename)
            if isinstance(cached, str):
                return True, f'{tag} (cached {cached})'
        if os.environ.get('HF_HUB_OFFLINE', '0').lower() in ('1', 'true', 'yes', 'on'):
            return False, f'{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set'
    else:
        host = urlparse(cfg.url).hostname or host
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        return False, f'{tag} is not cached and {host} is unreachable ({e})'
    return True, f'{tag} (download from {host})'


def create_train_model(args: argparse.Namespace, log) -> tuple[nn.Module, str]:
    """Create the model, fine-tuning from pretrained weights when they can be had. Returns (model, init source)."""
    name = args.model
    if not timm.is_model(name.split('.')[0]):
        pcam = ', '.join(timm.list_models('*pcam*')) or 'none registered'
        raise TrainError(f'--model {name!r}: not a registered timm model (PCam models: {pcam})')
    kwargs = _model_kwargs(args)
    if args.pretrained and not args.initial_checkpoint and not args.resume:
        available, where = pretrained_source(name)
        if available:
            try:
                return timm.create_model(name, pretrained=True, **kwargs), f'pretrained {where}'
            except (OSError, RuntimeError) as e:  # download or cache failure
                where = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        log(f'notice: pretrained weights for {name} are not available ({where}); '
            'training from random initialisation (pass --no-pretrained to silence this)')
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise TrainError(f'--model {name} does not accept these arguments {kwargs}: {e}') from e
    source = 'random init'
    if args.initial_checkpoint:
        from .checkpoint import read_checkpoint
        ckpt = read_checkpoint(args.initial_checkpoint)
        try:
            model.load_state_dict(ckpt['state_dict'])
        except RuntimeError as e:
            raise TrainError(f'--initial-checkpoint {args.initial_checkpoint}: weights of {ckpt.get("arch")!r} '
                             f'do not fit {name} {kwargs}: {str(e).splitlines()[0]}') from e
        source = f'initial checkpoint {args.initial_checkpoint}'
    return model, source


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------------- loops


def _oom_error(batch_size: int, device: torch.device, phase: str) -> TrainError:
    return TrainError(f'out of memory during {phase} with batch size {batch_size} per process on {device}: '
                      'lower --batch-size (and --validation-batch-size)')


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ('out of memory' in str(e) or "can't allocate memory" in str(e)))


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                    args: argparse.Namespace, device: torch.device, epoch: int, num_updates: int,
                    max_steps: int, scheduler=None, ema: ModelEmaV3 | None = None, scaler: NativeScaler | None = None,
                    amp_dtype: torch.dtype | None = None, show: bool = True) -> tuple[float, int]:
    """One pass over the training loader (at most `max_steps` updates). Returns (mean loss, update count)."""
    model.train()
    total, seen = 0.0, 0
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext())
    bar = tqdm(total=max_steps, desc=f'train {epoch}', disable=not show, leave=False, dynamic_ncols=True)
    for step, (x, y) in enumerate(loader):
        if step >= max_steps:
            break
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            with autocast:
                loss = loss_fn(model(x), y)
            if not torch.isfinite(loss):
                raise TrainError(f'loss became {loss.item()} at epoch {epoch}, step {step} (lr '
                                 f'{optimizer.param_groups[0]["lr"]:.3g}): lower --lr or keep --clip-grad on')
            clip = args.clip_grad if args.clip_grad else None
            if scaler is not None:
                scaler(loss, optimizer, clip_grad=clip, clip_mode=args.clip_mode, parameters=model.parameters())
            else:
                loss.backward()
                if clip is not None:
                    dispatch_clip_grad(model.parameters(), clip, mode=args.clip_mode)
                optimizer.step()
        except RuntimeError as e:
            if _is_oom(e):
                raise _oom_error(args.batch_size, device, 'training') from e
            raise
        optimizer.zero_grad(set_to_none=True)
        num_updates += 1
        if ema is not None:
            ema.update(_unwrap(model), step=num_updates)
        if scheduler is not None:
            scheduler.step_update(num_updates=num_updates)
        total += loss.item() * y.shape[0]
        seen += y.shape[0]
        bar.update(1)
        bar.set_postfix(loss=f'{total / seen:.4f}', lr=f'{optimizer.param_groups[0]["lr"]:.2e}')
    bar.close()
    if seen == 0:
        raise TrainError('the training loader produced no batch: the train split (after --limit-train) is smaller '
                         f'than one batch of {args.batch_size}; lower --batch-size')
    if dist.is_initialized():
        t = torch.tensor([total, seen], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, seen = t.tolist()
    return total / seen, num_updates


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device, amp_dtype: torch.dtype | None,
            channels_last: bool, desc: str = 'valid', show: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probability of class 1) over `loader`."""
    model.eval()
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext())
    labels, probs = [], []
    for x, y in tqdm(loader, desc=desc, disable=not show, leave=False, dynamic_ncols=True):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(x)
        probs.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(labels).numpy(), torch.cat(probs).double().numpy()


def _gather(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not dist.is_initialized():
        return labels, probs
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (labels, probs))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def validation_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    from .metrics import compute_metrics

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # a single-class validation subset gives NaN AUC; reported as such
        m = compute_metrics(labels, probs)
    return {'roc_auc': float(m['roc_auc']), 'accuracy': float(m['accuracy']), 'nll': float(m['nll'])}


# ----------------------------------------------------------------------------------------------- checkpoints & logs


def _train_args_record(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as primitives (a checkpoint must load with weights_only=True)."""
    out: dict[str, Any] = {}
    for k, v in vars(args).items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, dict):
            out[k] = {str(a): list(b) if isinstance(b, tuple) else b for a, b in v.items()}
        elif isinstance(v, (list, tuple)):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out


def _write_logs(out_dir: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_json(out_dir / LOG_JSON, history)
    fields = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator='\n')
    writer.writeheader()
    writer.writerows(history)
    with atomic_path(out_dir / LOG_CSV) as tmp:
        tmp.write_text(buf.getvalue())


def _check_resume(ckpt: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    if ckpt.get('train_state') != CHECKPOINT_FORMAT or 'optimizer' not in ckpt:
        raise TrainError(f'--resume {path}: not a training state written by this trainer (format '
                         f'{ckpt.get("train_state")!r}, expected {CHECKPOINT_FORMAT!r}); use --initial-checkpoint to '
                         'start a new run from its weights')
    saved = ckpt.get('train_args', {})
    if saved.get('model', '').split('.')[0] != args.model.split('.')[0]:
        raise TrainError(f'--resume {path}: the checkpoint trains {saved.get("model")!r}, not --model {args.model!r}')
    if saved.get('num_classes') != args.num_classes:
        raise TrainError(f'--resume {path}: the checkpoint has {saved.get("num_classes")} classes, '
                         f'--num-classes is {args.num_classes}')
    ours = _train_args_record(args)
    if saved.get('model_kwargs') != ours['model_kwargs']:
        raise TrainError(f'--resume {path}: the checkpoint was built with --model-kwargs {saved.get("model_kwargs")}, '
                         f'not {ours["model_kwargs"]}')


# ----------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train; returns {'best_checkpoint', 'last_checkpoint', 'best_metric', 'best_epoch', 'history', 'output'}."""
    args = build_parser().parse_args(argv)
    if args.output is None:
        if args.resume is None:
            raise TrainError('--output is required (the run folder) unless --resume names a checkpoint in one')
        args.output = str(Path(args.resume).parent)
    out_dir = Path(args.output)
    if args.opt.lower() not in list_optimizers():
        raise TrainError(f'--opt {args.opt!r}: unknown timm optimizer (e.g. adamw, sgd, rmsproptf)')
    if args.resume is None and (out_dir / LAST_NAME).exists():
        raise TrainError(f'--output {out_dir} already holds a run ({LAST_NAME}): pass --resume '
                         f'{out_dir / LAST_NAME} to continue it or choose another --output')

    dist_info = init_distributed_device_so(device=args.device)
    device = torch.device(dist_info['device'])
    rank, world = dist_info['global_rank'], dist_info['world_size']
    primary = rank == 0

    def log(msg: str) -> None:
        if primary:
            tqdm.write(msg, file=sys.stdout)

    try:
        return _run(args, out_dir, device, rank, world, primary, log)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def build_optimization(args: argparse.Namespace, model: nn.Module, updates_per_epoch: int):
    """The recipe's optimizer, LR schedule (and its epoch count), EMA of the weights and loss, from trainer arguments.

    Returns (optimizer, scheduler, num_epochs, ema or None, loss_fn).
    """
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum,
                                    **({'eps': args.opt_eps} if args.opt_eps is not None else {}),
                                    **({'betas': tuple(args.opt_betas)} if args.opt_betas else {}))
    sched_kw: dict[str, Any] = {}
    if args.decay_epochs is not None:
        sched_kw['decay_epochs'] = args.decay_epochs
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, decay_rate=args.decay_rate,
        step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates_per_epoch, **sched_kw)
    ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=True) if args.model_ema else None
    loss_fn = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss()
    return optimizer, scheduler, num_epochs, ema, loss_fn


def _run(args: argparse.Namespace, out_dir: Path, device: torch.device, rank: int, world: int, primary: bool,
         log) -> dict[str, Any]:
    seed_everything(args.seed)  # the same initial weights (and EMA copy) in every process
    amp_dtype = amp_dtype_for(device, args.amp_dtype)

    ckpt: dict[str, Any] | None = None
    if args.resume is not None:
        from .checkpoint import read_checkpoint
        resume_path = Path(args.resume)
        if not resume_path.is_file():
            raise TrainError(f'--resume {resume_path}: no such file')
        ckpt = read_checkpoint(resume_path)
        _check_resume(ckpt, args, resume_path)

    model, init_source = create_train_model(args, log)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    seed_everything(args.seed + rank)  # different augmentations and dropout in every process

    train_set, val_set = build_datasets(args)
    val_labels = _labels_of(val_set)
    if len(np.unique(val_labels)) < 2:
        raise TrainError(f'the validation split ({len(val_set)} patches after --limit-val) holds one class only: '
                         'ROC AUC, the selection metric, is undefined; validate on more patches')
    if world > 1:
        train_sampler: Sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                    seed=args.seed, drop_last=True)
        val_set = Subset(val_set, list(range(rank, len(val_set), world)))
    else:
        train_sampler = _EpochSampler(len(train_set), args.seed)
    workers = max(0, args.workers)
    loader_kw = dict(num_workers=workers, pin_memory=device.type == 'cuda', persistent_workers=False)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler, drop_last=True,
                              **loader_kw)
    val_loader = DataLoader(val_set, batch_size=args.validation_batch_size or args.batch_size, shuffle=False,
                            **loader_kw)
    if len(train_loader) == 0:
        raise TrainError(f'{len(train_set)} training patches per process make no full batch of {args.batch_size}: '
                         'lower --batch-size or raise --limit-train')
    steps = len(train_loader) if args.steps_per_epoch is None else max(1, min(args.steps_per_epoch,
                                                                               len(train_loader)))

    optimizer, scheduler, num_epochs, ema, loss_fn = build_optimization(args, model, steps)
    scaler = NativeScaler(device=device.type) if amp_dtype == torch.float16 else None

    start_epoch, num_updates = 0, 0
    history: list[dict[str, Any]] = []
    best_metric, best_epoch = -math.inf, -1
    if ckpt is not None:
        _unwrap(model).load_state_dict(ckpt['state_dict'])
        if ema is not None:
            if 'state_dict_ema' not in ckpt:
                raise TrainError(f'--resume {args.resume}: the run was trained without EMA; pass --no-model-ema')
            ema.module.load_state_dict(ckpt['state_dict_ema'])
        elif 'state_dict_ema' in ckpt:
            raise TrainError(f'--resume {args.resume}: the run was trained with EMA; drop --no-model-ema')
        optimizer.load_state_dict(ckpt['optimizer'])
        saved, ours = ckpt.get('train_args', {}), _train_args_record(args)
        changed = [k for k in _RUN_ARGS if k in saved and saved[k] != ours[k]]
        if changed:
            log('notice: resuming with changed arguments, the run will differ from an uninterrupted one: '
                + ', '.join(f'{k} {saved[k]} -> {ours[k]}' for k in changed))
        if scheduler is not None:
            if ckpt.get('scheduler') is not None and not set(changed) & set(_SCHEDULE):
                scheduler.load_state_dict(ckpt['scheduler'])
            # timm schedulers are functions of the step count: put the lr where this schedule has it now
            if args.sched_on_updates:
                scheduler.step_update(num_updates=int(ckpt['num_updates']))
            else:
                scheduler.step(int(ckpt['epoch']) + 1)
        if scaler is not None and ckpt.get('scaler') is not None:
            scaler.load_state_dict(ckpt['scaler'])
        start_epoch, num_updates = int(ckpt['epoch']) + 1, int(ckpt['num_updates'])
        history = list(ckpt.get('history', []))
        best_metric, best_epoch = float(ckpt.get('best_metric', -math.inf)), int(ckpt.get('best_epoch', -1))
        rng = ckpt.get('rng_states') or []
        if len(rng) == world:
            restore_rng_state(rng[rank])
        else:
            log(f'notice: the checkpoint holds RNG states of {len(rng)} processes, this run has {world}: reseeding')
            seed_everything(args.seed + rank + 7919 * start_epoch)
        init_source = f'resumed from {args.resume} (epoch {start_epoch - 1} done)'

    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda'
                                                    else None)

    out_dir.mkdir(parents=True, exist_ok=True)
    arch = args.model.split('.')[0]
    model_kwargs = _model_kwargs(args)
    log(f'train: {arch} {model_kwargs} ({init_source}), {len(train_set)} train / {len(val_labels)} valid patches, '
        f'{world} process(es) on {device}, autocast {amp_dtype or "off"}, {steps} updates/epoch, '
        f'epochs {start_epoch}..{num_epochs - 1}, output {out_dir}')
    show = primary and args.progress
    last_path, best_path = out_dir / LAST_NAME, out_dir / BEST_NAME

    for epoch in range(start_epoch, num_epochs):
        t0 = time.perf_counter()
        train_sampler.set_epoch(epoch)
        train_loss, num_updates = train_one_epoch(
            model, train_loader, optimizer, loss_fn, args, device, epoch, num_updates, steps,
            scheduler=scheduler if args.sched_on_updates else None, ema=ema, scaler=scaler, amp_dtype=amp_dtype,
            show=show)
        if scheduler is not None and not args.sched_on_updates:
            scheduler.step(epoch + 1)
        row: dict[str, Any] = {'epoch': epoch, 'updates': num_updates, 'lr': optimizer.param_groups[0]['lr'],
                               'train_loss': train_loss}
        candidates = {'model': _unwrap(model)}
        if ema is not None:
            candidates['ema'] = ema.module
        scores: dict[str, float] = {}
        for tag, net in candidates.items():
            try:
                labels, probs = _gather(*predict(net, val_loader, device, amp_dtype, args.channels_last,
                                                 desc=f'valid {tag}', show=show))
            except RuntimeError as e:
                if _is_oom(e):
                    raise _oom_error(args.validation_batch_size or args.batch_size, device, 'validation') from e
                raise
            prefix = 'val_' if tag == 'model' else 'ema_val_'
            metrics = validation_metrics(labels, probs)
            row.update({prefix + k: v for k, v in metrics.items()})
            row['val_n'] = int(labels.shape[0])
            scores[tag] = metrics['roc_auc']
        chosen = max(scores, key=lambda k: -math.inf if math.isnan(scores[k]) else scores[k])
        metric = scores[chosen]
        improved = not math.isnan(metric) and metric > best_metric
        if improved:
            best_metric, best_epoch = metric, epoch
        row.update({'best_roc_auc': best_metric if best_epoch >= 0 else None, 'best_epoch': best_epoch,
                    'time_s': round(time.perf_counter() - t0, 3)})
        history.append(row)
        rng_states = [capture_rng_state()]
        if world > 1:
            rng_states = [None] * world
            dist.all_gather_object(rng_states, capture_rng_state())
        if primary:
            _save_epoch(args, out_dir, model, ema, optimizer, scheduler, scaler, epoch, num_updates, history,
                        best_metric, best_epoch, rng_states, arch, model_kwargs,
                        best=(candidates[chosen], chosen, row) if improved else None)
            flag = f' (best, {chosen} weights)' if improved else ''
            log(f'epoch {epoch}: train loss {train_loss:.4f}, val AUC {row["val_roc_auc"]:.4f}'
                + (f', EMA val AUC {row["ema_val_roc_auc"]:.4f}' if ema is not None else '') + flag)
        if world > 1:
            dist.barrier()

    summary = {'best_checkpoint': str(best_path) if best_epoch >= 0 else None, 'last_checkpoint': str(last_path),
               'best_metric': best_metric if best_epoch >= 0 else None, 'best_epoch': best_epoch,
               'history': history, 'output': str(out_dir)}
    if primary:
        best = f'{best_metric:.4f} at epoch {best_epoch}' if best_epoch >= 0 else 'n/a'
        log(f'done: {len(history)} epochs of {arch}, best val ROC AUC {best} -> {best_path}; last state {last_path}; '
            f'log {out_dir / LOG_CSV}')
    return summary


def _save_epoch(args: argparse.Namespace, out_dir: Path, model: nn.Module, ema: ModelEmaV3 | None,
                optimizer: torch.optim.Optimizer, scheduler, scaler: NativeScaler | None, epoch: int,
                num_updates: int, history: list[dict[str, Any]], best_metric: float, best_epoch: int,
                rng_states: list[dict[str, Any]], arch: str, model_kwargs: dict[str, Any],
                best: tuple[nn.Module, str, dict[str, Any]] | None) -> None:
    """Write model_best.pth first (when improved), then last.pth, then the logs: a kill between any two leaves a
    consistent run (resuming from last.pth repeats at most the current epoch)."""
    from .checkpoint import save_checkpoint

    metrics = {k: v for k, v in history[-1].items() if isinstance(v, (int, float)) and v is not None}
    if best is not None:
        net, tag, row = best
        save_checkpoint(out_dir / BEST_NAME, net, arch=arch, model_kwargs=model_kwargs, epoch=epoch,
                        metrics=metrics, weights=tag, best_metric=best_metric, selection='val_roc_auc',
                        train_state=CHECKPOINT_FORMAT + '+best')
    extra: dict[str, Any] = {
        'train_state': CHECKPOINT_FORMAT, 'epoch': epoch, 'num_updates': num_updates, 'metrics': metrics,
        'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict() if scheduler is not None else None,
        'scaler': scaler.state_dict() if scaler is not None else None, 'history': history,
        'best_metric': best_metric, 'best_epoch': best_epoch, 'rng_states': rng_states,
        'train_args': _train_args_record(args),
    }
    if ema is not None:
        extra['state_dict_ema'] = ema.module.state_dict()
    save_checkpoint(out_dir / LAST_NAME, _unwrap(model), arch=arch, model_kwargs=model_kwargs, **extra)
    _write_logs(out_dir, history)


def cli(argv: Sequence[str] | None = None) -> int:
    try:
        main(argv)
    except (TrainError, FileNotFoundError, ValueError) as e:
        print(f'train: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(cli())
