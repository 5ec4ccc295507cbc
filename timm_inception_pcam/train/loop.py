"""The data loaders, one training epoch, and validation of a run."""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from tqdm import tqdm

from ..errors import PCamError
from ..preprocess import preprocess_patches
from .config import TrainConfig, TrainError

__all__ = ['build_loaders', 'train_one_epoch', 'predict', 'validation_metrics', 'gather', 'unwrap', 'is_oom',
           'oom_error', 'diverged_error']


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


def _limit(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    n = len(dataset)
    if limit is None or limit >= n:
        return dataset
    g = torch.Generator()
    g.manual_seed(seed)
    return Subset(dataset, torch.randperm(n, generator=g)[:limit].sort().values.tolist())


def _labels_of(dataset: Dataset) -> np.ndarray:
    if isinstance(dataset, Subset):
        return np.asarray(_labels_of(dataset.dataset))[np.asarray(dataset.indices)]
    return np.asarray(dataset.labels)


def _preprocessed_batch(samples: list[tuple[Any, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation collate: raw uint8 patches -> the one preprocessing of every inference path (preprocess.py)."""
    images = np.stack([s[0] for s in samples])
    labels = torch.as_tensor([int(s[1]) for s in samples], dtype=torch.int64)
    return torch.from_numpy(preprocess_patches(images)), labels


def build_loaders(cfg: TrainConfig, device: torch.device, rank: int, world: int
                  ) -> tuple[DataLoader, DataLoader, np.ndarray, int]:
    """(train loader, validation loader, validation labels of all processes, updates per epoch)."""
    from ..data import PCamDataset, create_pcam_transform

    if not cfg.data_dir.is_dir():
        what = 'a file, not a folder' if cfg.data_dir.exists() else 'no such folder'
        raise TrainError(f'--data-dir {cfg.data_dir}: {what} (expected the folder of the official PCam HDF5 files)')
    train_set: Dataset = PCamDataset(cfg.data_dir, cfg.train_split, transform=create_pcam_transform(is_training=True),
                                     in_memory=cfg.in_memory)
    val_set: Dataset = PCamDataset(cfg.data_dir, cfg.val_split, in_memory=cfg.in_memory)  # raw: batch preprocessing
    train_set = _limit(train_set, cfg.limit_train, cfg.seed)
    val_set = _limit(val_set, cfg.limit_val, cfg.seed + 1)
    val_labels = _labels_of(val_set)
    if len(np.unique(val_labels)) < 2:
        raise TrainError(f'the validation split ({len(val_set)} patches after --limit-val) holds one class only: '
                         'ROC AUC, the selection metric, is undefined; validate on more patches')
    if world > 1:
        sampler: Sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                              drop_last=True)
        val_set = Subset(val_set, list(range(rank, len(val_set), world)))
    else:
        sampler = _EpochSampler(len(train_set), cfg.seed)
    kw: dict[str, Any] = dict(num_workers=cfg.workers, pin_memory=device.type == 'cuda', persistent_workers=False)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **kw)
    val_loader = DataLoader(val_set, batch_size=cfg.validation_batch_size or cfg.batch_size, shuffle=False,
                            collate_fn=_preprocessed_batch, **kw)
    if len(train_loader) == 0:
        raise TrainError(f'{len(train_set)} training patches per process make no full batch of {cfg.batch_size}: '
                         f'lower --batch-size{" or raise --limit-train" if cfg.limit_train else ""}')
    steps = len(train_loader) if cfg.steps_per_epoch is None else min(cfg.steps_per_epoch, len(train_loader))
    return train_loader, val_loader, val_labels, steps


def _batches(loader: Iterable) -> Iterator[Any]:
    """Iterate `loader`; a user error raised in a DataLoader worker comes back as its own one-line message.

    torch re-raises a worker's exception with the worker's traceback inside the message; for a PCamError (a bad
    file, say) that traceback is noise, so the original message is restored. Other errors (bugs) keep it.
    """
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except PCamError as e:
            text = str(e)
            if 'Original Traceback' not in text:
                raise
            last = text.rstrip().splitlines()[-1]
            message = last.split(': ', 1)[1] if ': ' in last else last
            raise type(e)(f'{message} (in a DataLoader worker)') from None
        yield batch


# ----------------------------------------------------------------------------------------------- loops


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def oom_error(batch_size: int, device: torch.device, phase: str) -> TrainError:
    return TrainError(f'out of memory during {phase} with batch size {batch_size} per process on {device}: '
                      'lower --batch-size (and --validation-batch-size)')


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ('out of memory' in str(e) or "can't allocate memory" in str(e)))


def diverged_error(what: str, epoch: int, lr: float) -> TrainError:
    return TrainError(f'training diverged: {what} at epoch {epoch} (lr {lr:.3g}); lower --lr or keep --clip-grad on')


def training_loss(out: torch.Tensor | tuple, y: torch.Tensor, loss_fn: nn.Module, aux_weight: float) -> torch.Tensor:
    """The main loss, plus `aux_weight` x each auxiliary classifier's when the model returns `(logits, aux)`;
    computed in float32 (CPU autocast leaves a bf16 log-softmax in bf16)."""
    if isinstance(out, tuple):
        logits, aux = out
        return loss_fn(logits.float(), y) + aux_weight * sum(loss_fn(a.float(), y) for a in aux)
    return loss_fn(out.float(), y)


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                    cfg: TrainConfig, device: torch.device, epoch: int, num_updates: int,
                    max_steps: int, scheduler=None, ema: ModelEmaV3 | None = None, scaler: NativeScaler | None = None,
                    amp_dtype: torch.dtype | None = None, show: bool = True) -> tuple[float, int]:
    """One pass over the training loader (at most `max_steps` updates). Returns (mean loss, update count)."""
    model.train()
    total, seen = 0.0, 0
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext())
    clip = cfg.clip_grad if cfg.clip_grad else None
    bar = tqdm(total=max_steps, desc=f'train {epoch}', disable=not show, leave=False, dynamic_ncols=True)
    for step, (x, y) in enumerate(_batches(loader)):
        if step >= max_steps:
            break
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            with autocast:
                loss = training_loss(model(x), y, loss_fn, cfg.aux_weight)
            if not torch.isfinite(loss):
                raise diverged_error(f'the loss became {loss.item()} at step {step}', epoch,
                                     optimizer.param_groups[0]['lr'])
            if scaler is not None:
                scaler(loss, optimizer, clip_grad=clip, clip_mode=cfg.clip_mode, parameters=model.parameters())
            else:
                loss.backward()
                if clip is not None:
                    dispatch_clip_grad(model.parameters(), clip, mode=cfg.clip_mode)
                optimizer.step()
        except RuntimeError as e:
            if is_oom(e):
                raise oom_error(cfg.batch_size, device, 'training') from e
            raise
        optimizer.zero_grad(set_to_none=True)
        num_updates += 1
        if ema is not None:
            ema.update(unwrap(model), step=num_updates)
        if scheduler is not None:
            scheduler.step_update(num_updates=num_updates)
        total += loss.item() * y.shape[0]
        seen += y.shape[0]
        bar.update(1)
        bar.set_postfix(loss=f'{total / seen:.4f}', lr=f'{optimizer.param_groups[0]["lr"]:.2e}')
    bar.close()
    if seen == 0:
        raise TrainError('the training loader produced no batch: the train split (after --limit-train) is smaller '
                         f'than one batch of {cfg.batch_size}; lower --batch-size')
    if dist.is_initialized():
        t = torch.tensor([total, seen], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, seen = t.tolist()
    return total / seen, num_updates


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device, amp_dtype: torch.dtype | None,
            channels_last: bool, desc: str = 'valid', show: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probability of class 1) over `loader`. The features come under autocast, the head runs in
    float32: bf16 logits round near-equal patches to one score (early in training every validation AUC read 0.5)."""
    model.eval()
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext())
    labels, probs = [], []
    for x, y in tqdm(_batches(loader), desc=desc, disable=not show, leave=False, dynamic_ncols=True):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            features = model.forward_features(x)
        logits = model.forward_head(features.float())
        probs.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(labels).numpy(), torch.cat(probs).double().numpy()


def gather(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate every process's validation share (a no-op without torch.distributed)."""
    if not dist.is_initialized():
        return labels, probs
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (labels, probs))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def validation_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    from ..metrics import compute_metrics

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # a single-class validation subset gives NaN AUC; reported as such
        m = compute_metrics(labels, probs)
    return {'roc_auc': float(m['roc_auc']), 'accuracy': float(m['accuracy']), 'nll': float(m['nll'])}


def validate(candidates: dict[str, nn.Module], loader: Iterable, cfg: TrainConfig, device: torch.device,
             amp_dtype: torch.dtype | None, epoch: int, lr: float, show: bool
             ) -> tuple[dict[str, Any], dict[str, float]]:
    """Score each of `candidates` ('model', 'ema') on the validation loader: (history row entries, ROC AUC per tag).

    Non-finite outputs mean the run diverged: TrainError saying to lower --lr."""
    row: dict[str, Any] = {}
    scores: dict[str, float] = {}
    for tag, net in candidates.items():
        try:
            labels, probs = gather(*predict(net, loader, device, amp_dtype, cfg.channels_last, desc=f'valid {tag}',
                                            show=show))
        except RuntimeError as e:
            if is_oom(e):
                raise oom_error(cfg.validation_batch_size or cfg.batch_size, device, 'validation') from e
            raise
        if not np.isfinite(probs).all():
            raise diverged_error(f'the {tag} weights give non-finite outputs on validation', epoch, lr)
        metrics = validation_metrics(labels, probs)
        prefix = 'val_' if tag == 'model' else 'ema_val_'
        row.update({prefix + k: v for k, v in metrics.items()})
        row['val_n'] = int(labels.shape[0])
        scores[tag] = metrics['roc_auc']
    return row, scores


def best_of(scores: dict[str, float]) -> str:
    """The tag with the highest ROC AUC (NaN counts as lowest)."""
    return max(scores, key=lambda k: -math.inf if math.isnan(scores[k]) else scores[k])
