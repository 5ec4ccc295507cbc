"""`train(cfg)`: one training run, from a TrainConfig to a TrainResult."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler
from timm.utils.distributed import init_distributed_device_so
from tqdm.contrib.logging import logging_redirect_tqdm

from ..precision import autocast_dtype, choose_precision
from ..storage import atomic_path, claim_output_dir
from .checkpointing import RunState, capture_rng_state, check_resume, seed_everything
from .config import BEST_NAME, LAST_NAME, LOG_CSV, LOG_JSON, TrainConfig, TrainError, TrainResult, read_resume
from .loop import best_of, build_loaders, train_one_epoch, unwrap, validate
from .model import create_train_model

__all__ = ['train', 'build_optimization']

_logger = logging.getLogger('timm_inception_pcam.train')


def build_optimization(cfg: TrainConfig, model: nn.Module, updates_per_epoch: int):
    """The recipe's optimizer, LR schedule (and its epoch count), EMA of the weights and loss, from a TrainConfig.

    Returns (optimizer, scheduler, num_epochs, ema or None, loss_fn).
    """
    optimizer = _create_optimizer(cfg, model)
    scheduler, num_epochs = _create_scheduler(cfg, optimizer, updates_per_epoch)
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=True) if cfg.model_ema else None
    loss_fn = LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else nn.CrossEntropyLoss()
    return optimizer, scheduler, num_epochs, ema, loss_fn


def _create_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    return create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                               **({'eps': cfg.opt_eps} if cfg.opt_eps is not None else {}),
                               **({'betas': tuple(cfg.opt_betas)} if cfg.opt_betas else {}))


def _check_optimizer(cfg: TrainConfig) -> None:
    """TrainError for an --opt timm does not have, or settings (--opt-betas ...) it refuses, found by building it
    for a one-layer model."""
    if cfg.opt.lower() not in list_optimizers():
        raise TrainError(f'--opt {cfg.opt!r}: unknown timm optimizer (e.g. adamw, sgd, rmsproptf)')
    betas = f' --opt-betas {" ".join(f"{b:g}" for b in cfg.opt_betas)}' if cfg.opt_betas else ''
    try:
        default = create_optimizer_v2(nn.Linear(1, 1), opt=cfg.opt).defaults.get('betas')
        if cfg.opt_betas and default is not None and len(cfg.opt_betas) != len(default):
            raise TrainError(f'--opt {cfg.opt}{betas}: {cfg.opt} takes {len(default)} betas (default '
                             f'{" ".join(f"{b:g}" for b in default)}), got {len(cfg.opt_betas)}')
        layer = nn.Linear(1, 1)
        optimizer = _create_optimizer(cfg, layer)
        layer(torch.ones(1, 1)).sum().backward()
        optimizer.step()  # some refuse their settings only here (lamb's betas)
    except TrainError:
        raise
    except (ValueError, IndexError, TypeError, AssertionError, RuntimeError) as e:
        raise TrainError(f'--opt {cfg.opt}{betas}: the optimizer refuses these settings ({type(e).__name__}: '
                         f'{e})') from None


def _create_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> tuple[Any, int]:
    """timm's scheduler for the recipe, and the epoch count it implies."""
    return create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr, decay_rate=cfg.decay_rate, step_on_epochs=not cfg.sched_on_updates,
        updates_per_epoch=updates_per_epoch,
        **({'decay_epochs': cfg.decay_epochs} if cfg.decay_epochs is not None else {}))


def _check_schedule(cfg: TrainConfig) -> None:
    """TrainError for a --sched (or its settings) timm refuses, found by building it for a one-tensor optimizer."""
    try:
        _create_scheduler(cfg, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr),
                          cfg.steps_per_epoch or 1)
    except (ValueError, AssertionError, ZeroDivisionError) as e:
        raise TrainError(f'--sched {cfg.sched}: {e} (a timm scheduler, e.g. cosine, step, plateau, poly, wsd, '
                         f'none)') from None


def _device_name(requested: str | None) -> str:
    """The device to train on: `requested` checked, or cuda when available, else cpu."""
    if requested is None:
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        kind = torch.device(requested).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ('cpu', 'cuda'):
        raise TrainError(f'--device {requested!r}: expected cpu, cuda or cuda:N')
    if kind == 'cuda' and not torch.cuda.is_available():
        raise TrainError(f'--device {requested}: no usable CUDA GPU on this machine; use --device cpu or leave it out')
    return requested


@contextlib.contextmanager
def _messages(primary: bool, progress: bool) -> Iterator[None]:
    """Only the primary process logs; log records and tqdm bars do not overwrite each other."""
    def rank_filter(_record: logging.LogRecord) -> bool:
        return primary

    loggers = [_logger, logging.getLogger('timm_inception_pcam.storage')]
    for lg in loggers:
        lg.addFilter(rank_filter)
    try:
        with logging_redirect_tqdm() if primary and progress else contextlib.nullcontext():
            yield
    finally:
        for lg in loggers:
            lg.removeFilter(rank_filter)


def train(cfg: TrainConfig) -> TrainResult:
    """Train as `cfg` says; under torchrun every process calls it (rank 0 writes the files).

    Raises TrainError (or another PCamError) with a one-line message for anything the user can change: bad
    options, data, checkpoints, an output folder in use or holding a finished run, a diverging loss, out of memory.
    """
    out_dir = cfg.run_dir
    _check_optimizer(cfg)
    resume_ckpt: dict[str, Any] | None = None
    _check_schedule(cfg)
    device_name = _device_name(cfg.device)
    if cfg.resume is not None:
        resume_ckpt = read_resume(cfg.resume)
        check_resume(resume_ckpt, cfg, cfg.resume)
    # Rank 0 (known from torchrun's environment before the process group exists) owns the folder; if it refuses,
    # torchrun stops the other processes.
    primary = int(os.environ.get('RANK', '0')) == 0
    claim = claim_output_dir(out_dir, overwrite=cfg.overwrite, resume=cfg.resume is not None, finished=(LAST_NAME,),
                             replaces=(LAST_NAME, BEST_NAME, LOG_CSV, 'log.json'),
                             resume_hint=f'--resume {out_dir / LAST_NAME} to continue it') \
        if primary else contextlib.nullcontext(out_dir)
    with claim, _messages(primary, cfg.progress):
        if primary and cfg.resume is not None:
            _carry_run(cfg.resume.parent, out_dir)
        dist_info = init_distributed_device_so(device=device_name)
        try:
            return _run(cfg, out_dir, resume_ckpt, torch.device(dist_info['device']), dist_info['global_rank'],
                        dist_info['world_size'])
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def _carry_run(run_dir: Path, out_dir: Path) -> None:
    """A run resumed into another folder takes its files along (model_best.pth, last.pth, the logs): the folder and
    the result named files that were only in the first one (all of them when nothing was left to train)."""
    if run_dir.resolve() == out_dir.resolve():
        return
    for name in (BEST_NAME, LAST_NAME, LOG_JSON, LOG_CSV):
        if (run_dir / name).is_file() and not (out_dir / name).exists():
            with atomic_path(out_dir / name) as tmp:
                shutil.copyfile(run_dir / name, tmp)


def _run(cfg: TrainConfig, out_dir: Path, resume_ckpt: dict[str, Any] | None, device: torch.device, rank: int,
         world: int) -> TrainResult:
    primary = rank == 0
    seed_everything(cfg.seed)  # the same initial weights (and EMA copy) in every process
    precision = choose_precision(device, cfg.precision)
    amp_dtype = autocast_dtype(precision)

    model, model_kwargs, init_source = create_train_model(cfg, resume_ckpt)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    seed_everything(cfg.seed + rank)  # different augmentations and dropout in every process

    train_loader, val_loader, val_labels, steps = build_loaders(cfg, device, rank, world)
    optimizer, scheduler, num_epochs, ema, loss_fn = build_optimization(cfg, model, steps)
    scaler = NativeScaler(device=device.type) if amp_dtype == torch.float16 else None
    arch = cfg.model.split('.')[0]
    from ..data.provenance import folder_provenance

    provenance = folder_provenance(cfg.data_dir, (cfg.train_split, cfg.val_split))['provenance']
    state = RunState(model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, scaler=scaler, arch=arch,
                     model_kwargs=model_kwargs, data_provenance=provenance)
    if resume_ckpt is not None:
        state.restore(resume_ckpt, cfg, rank, world)
        init_source = f'resumed from {cfg.resume} (epoch {state.start_epoch - 1} done)'
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda'
                                                    else None)

    if state.start_epoch >= num_epochs:
        _logger.info('nothing to train: %s has done all %d epochs of its schedule (--epochs N with N > %d trains it '
                     'further)', cfg.resume, state.start_epoch, num_epochs)
    else:
        if cfg.warmup_epochs >= cfg.epochs:
            _logger.info('notice: --warmup-epochs %g covers all %d epochs: the whole run is warm-up (lr from %g '
                         'towards %g)', cfg.warmup_epochs, cfg.epochs, cfg.warmup_lr, cfg.lr)
        _logger.info('train: %s %s (%s), %d train / %d valid patches, %d process(es) on %s, precision %s, '
                     '%d updates/epoch, epochs %d..%d, output %s', arch, model_kwargs, init_source,
                     len(train_loader.dataset), len(val_labels), world, device, precision, steps, state.start_epoch,
                     num_epochs - 1, out_dir)
    show = primary and cfg.progress
    for epoch in range(state.start_epoch, num_epochs):
        t0 = time.perf_counter()
        train_loader.sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]['lr']  # the epoch's (with --sched-on-updates: its first update's)
        train_loss, state.num_updates = train_one_epoch(
            model, train_loader, optimizer, loss_fn, cfg, device, epoch, state.num_updates, steps,
            scheduler=scheduler if cfg.sched_on_updates else None, ema=ema, scaler=scaler, amp_dtype=amp_dtype,
            show=show)
        if scheduler is not None and not cfg.sched_on_updates:
            scheduler.step(epoch + 1)
        candidates = {'model': unwrap(model), **({'ema': ema.module} if ema is not None else {})}
        scores_row, scores = validate(candidates, val_loader, cfg, device, amp_dtype, epoch, lr, show)
        row: dict[str, Any] = {'epoch': epoch, 'updates': state.num_updates, 'lr': lr, 'train_loss': train_loss,
                               **scores_row}
        chosen = best_of(scores)
        improved = scores[chosen] == scores[chosen] and scores[chosen] > state.best_metric  # not NaN, better
        if improved:
            state.best_metric, state.best_epoch = scores[chosen], epoch
        row.update({'best_roc_auc': state.best_metric if state.best_epoch >= 0 else None,
                    'best_epoch': state.best_epoch, 'time_s': round(time.perf_counter() - t0, 3)})
        state.history.append(row)
        rng_states = [capture_rng_state()]
        if world > 1:
            rng_states = [None] * world
            dist.all_gather_object(rng_states, capture_rng_state())
        if primary:
            state.save(cfg, out_dir, epoch, rng_states, best=(candidates[chosen], chosen) if improved else None)
            _logger.info('epoch %d: train loss %.4f, val AUC %.4f%s%s', epoch, train_loss, row['val_roc_auc'],
                         f', EMA val AUC {row["ema_val_roc_auc"]:.4f}' if ema is not None else '',
                         f' (best, {chosen} weights)' if improved else '')
        if world > 1:
            dist.barrier()

    found = state.best_epoch >= 0
    result = TrainResult(output=out_dir, last_checkpoint=out_dir / LAST_NAME,
                         best_checkpoint=out_dir / BEST_NAME if found else None,
                         best_metric=state.best_metric if found else None, best_epoch=state.best_epoch,
                         history=state.history)
    best = f'{state.best_metric:.4f} at epoch {state.best_epoch}' if found else 'n/a'
    epochs = len(state.history)
    _logger.info('done: %d epoch%s of %s, best val ROC AUC %s -> %s; last state %s; log %s', epochs,
                 '' if epochs == 1 else 's', arch, best, result.best_checkpoint, result.last_checkpoint,
                 out_dir / LOG_CSV)
    return result
