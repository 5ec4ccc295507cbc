"""Training step throughput: our trainer's step (`timm_inception_pcam.train.train_one_epoch`) vs a bare PyTorch loop.

Same model, initial weights, batch, optimizer, loss, autocast dtype and memory format; both consume the same
pre-made batch, so data loading is not part of either. What the trainer adds per step is its own cost: gradient
clipping, the EMA update, the per-update LR schedule, the finite-loss check and loss bookkeeping. The two loops run
round-robin, one step each per round; the overhead is the ratio of the median step times (target: under 5 %).
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from .common import Sizes, create, interleaved_times, summarize

__all__ = ['OVERHEAD_TARGET', 'trainer_setup', 'run', 'markdown']

OVERHEAD_TARGET = 0.05
MODEL = 'inception_v4_pcam'


def trainer_setup(model: nn.Module, batch_size: int, steps: int, ema: bool = True):
    """The trainer's default arguments, and its optimizer / schedule / EMA / loss built exactly as it builds them."""
    from timm_inception_pcam.train import build_optimization, build_parser

    args = build_parser().parse_args(['--data-dir', '.', '--model', MODEL, '--batch-size', str(batch_size)])
    args.model_ema = args.model_ema and ema
    optimizer, scheduler, _, model_ema, loss_fn = build_optimization(args, model, max(1, steps))
    return args, optimizer, scheduler, model_ema, loss_fn


def run(sizes: Sizes, progress: bool = True) -> dict[str, Any]:
    from timm.optim import create_optimizer_v2

    from timm_inception_pcam.train import amp_dtype_for, train_one_epoch

    torch.manual_seed(0)
    device = torch.device('cpu')
    ours = create(MODEL, sizes).train()
    bare = copy.deepcopy(ours)
    args, optimizer, scheduler, ema, loss_fn = trainer_setup(ours, sizes.train_batch, sizes.train_steps)
    amp_dtype = amp_dtype_for(device, args.amp_dtype)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    ours.to(memory_format=memory_format)
    bare.to(memory_format=memory_format)
    bare_opt = create_optimizer_v2(bare, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                   momentum=args.momentum)
    x = torch.randn(sizes.train_batch, 3, 96, 96)
    y = torch.randint(0, 2, (sizes.train_batch,))
    batch = [(x, y)]
    updates = [0]

    def trainer_step() -> None:
        _, updates[0] = train_one_epoch(ours, batch, optimizer, loss_fn, args, device, 0, updates[0], 1,
                                        scheduler=scheduler, ema=ema, amp_dtype=amp_dtype, show=False)

    def bare_step() -> None:
        xb = x.contiguous(memory_format=memory_format)
        with torch.autocast('cpu', dtype=amp_dtype) if amp_dtype is not None else nullcontext():
            loss = loss_fn(bare(xb), y)
        loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    with tqdm(total=1, desc='training step', disable=not progress, leave=False):
        times = interleaved_times({'trainer': trainer_step, 'bare': bare_step}, sizes.train_steps, sizes.warmup)
    ours_t, bare_t = summarize(times['trainer'], sizes.train_batch), summarize(times['bare'], sizes.train_batch)
    overhead = ours_t['median_s'] / bare_t['median_s'] - 1
    return {
        'model': MODEL, 'depths': list(sizes.depths) if sizes.depths else None, 'batch': sizes.train_batch,
        'autocast': str(amp_dtype).replace('torch.', '') if amp_dtype else 'off',
        'channels_last': bool(args.channels_last),
        'trainer_extras': {'optimizer': args.opt, 'clip_grad': args.clip_grad, 'clip_mode': args.clip_mode,
                           'model_ema': bool(args.model_ema), 'label_smoothing': args.smoothing,
                           'schedule': f'{args.sched}, per update' if args.sched_on_updates else args.sched},
        'trainer': ours_t, 'bare': bare_t,
        'trainer_patches_per_s': ours_t['items_per_s'], 'bare_patches_per_s': bare_t['items_per_s'],
        'overhead': overhead, 'overhead_target': OVERHEAD_TARGET, 'target_met': overhead < OVERHEAD_TARGET,
    }


def markdown(section: dict[str, Any], fmt) -> list[str]:
    s = section
    depths = f' depths={tuple(s["depths"])}' if s['depths'] else ''
    extras = s['trainer_extras']
    return [
        f'{s["model"]}{depths}, batch {s["batch"]}, autocast {s["autocast"]}, channels_last {s["channels_last"]}, '
        f'{extras["optimizer"]}; the trainer adds gradient clipping ({extras["clip_mode"]} {extras["clip_grad"]}), '
        f'EMA ({extras["model_ema"]}) and the LR schedule ({extras["schedule"]}). Same pre-made batch for both.', '',
        '| loop | median step (s) | patches/s |', '| --- | --- | --- |',
        f'| bare PyTorch | {fmt(s["bare"]["median_s"])} | {fmt(s["bare_patches_per_s"])} |',
        f'| our trainer | {fmt(s["trainer"]["median_s"])} | {fmt(s["trainer_patches_per_s"])} |',
        '', f'Trainer overhead: **{s["overhead"]:+.1%}** (target under {s["overhead_target"]:.0%}: '
        f'{"met" if s["target_met"] else "not met"}).', '']
