"""Training step throughput: our trainer's step (`timm_inception_pcam.train.train_one_epoch`) vs bare PyTorch loops.

Same model, initial weights, batch, optimizer, loss, autocast dtype and memory format; every loop consumes the same
pre-made batch, so data loading is not part of any. Four loops, run round-robin (one step each per round):

- `bare`: forward, loss, backward, optimizer step: the least a training step does;
- `bare_recipe`: `bare` plus what the trainer's default recipe adds to each step, written plainly: gradient clipping
  (timm's `dispatch_clip_grad`) and the EMA update (timm's `ModelEmaV3`);
- `trainer`: our trainer's step with its default recipe (clipping, EMA, per-update LR schedule, finite-loss check,
  loss bookkeeping);
- `trainer_plain`: our trainer's step with `--clip-grad 0 --no-model-ema`.

The trainer's overhead is what it adds over a bare loop doing the same work: `trainer` / `bare_recipe` and
`trainer_plain` / `bare`, each the median over rounds of the per-round ratio (target: under 5 %). What the recipe's
extras cost (`bare_recipe` / `bare`) is reported beside it: that is the price of EMA and clipping, which any loop
doing them pays, not the trainer's.
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from .common import Sizes, create, summarize

__all__ = ['OVERHEAD_TARGET', 'trainer_setup', 'run', 'markdown']

OVERHEAD_TARGET = 0.05
MODEL = 'inception_v4_pcam'
LOOPS = ('bare', 'bare_recipe', 'trainer', 'trainer_plain')


def trainer_setup(model: nn.Module, batch_size: int, steps: int, ema: bool = True):
    """The trainer's default configuration, and its optimizer / schedule / EMA / loss built exactly as it builds
    them."""
    from timm_inception_pcam.train import TrainConfig, build_optimization

    cfg = TrainConfig(data_dir=Path('.'), model=MODEL, batch_size=batch_size)
    cfg = dataclasses.replace(cfg, model_ema=cfg.model_ema and ema)
    optimizer, scheduler, _, model_ema, loss_fn = build_optimization(cfg, model, max(1, steps))
    return cfg, optimizer, scheduler, model_ema, loss_fn


def _paired(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of time[num] / time[den] - 1: drift in the machine's load cancels within a round."""
    return statistics.median(a / b for a, b in zip(times[num], times[den])) - 1.0


def run(sizes: Sizes, progress: bool = True) -> dict[str, Any]:
    from timm.utils import dispatch_clip_grad

    from timm_inception_pcam.precision import autocast_dtype, choose_precision
    from timm_inception_pcam.train import train_one_epoch

    torch.manual_seed(0)
    device = torch.device('cpu')
    base = create(MODEL, sizes).train()
    models = {name: copy.deepcopy(base) for name in LOOPS}
    setups = {'bare': trainer_setup(models['bare'], sizes.train_batch, sizes.train_steps, ema=False),
              'bare_recipe': trainer_setup(models['bare_recipe'], sizes.train_batch, sizes.train_steps),
              'trainer': trainer_setup(models['trainer'], sizes.train_batch, sizes.train_steps),
              'trainer_plain': trainer_setup(models['trainer_plain'], sizes.train_batch, sizes.train_steps, ema=False)}
    args = setups['trainer'][0]
    plain_args = dataclasses.replace(args, clip_grad=0.0, model_ema=False)
    amp_dtype = autocast_dtype(choose_precision(device, args.precision))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    for model in models.values():
        model.to(memory_format=memory_format)
    x = torch.randn(sizes.train_batch, 3, 96, 96)
    y = torch.randint(0, 2, (sizes.train_batch,))
    batch = [(x, y)]
    updates = {name: 0 for name in LOOPS}

    def trainer_step(name: str, step_args) -> Callable[[], None]:
        _, optimizer, scheduler, ema, loss_fn = setups[name]

        def step() -> None:
            _, updates[name] = train_one_epoch(models[name], batch, optimizer, loss_fn, step_args, device, 0,
                                               updates[name], 1, scheduler=scheduler, ema=ema, amp_dtype=amp_dtype,
                                               show=False)
        return step

    def bare_step(name: str, recipe: bool) -> Callable[[], None]:
        model = models[name]
        _, optimizer, _, ema, loss_fn = setups[name]

        def step() -> None:
            xb = x.contiguous(memory_format=memory_format)
            with torch.autocast('cpu', dtype=amp_dtype) if amp_dtype is not None else nullcontext():
                loss = loss_fn(model(xb), y)
            loss.backward()
            if recipe:
                dispatch_clip_grad(model.parameters(), args.clip_grad, mode=args.clip_mode)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if recipe and ema is not None:
                updates[name] += 1
                ema.update(model, step=updates[name])
        return step

    steps = {'bare': bare_step('bare', False), 'bare_recipe': bare_step('bare_recipe', True),
             'trainer': trainer_step('trainer', args), 'trainer_plain': trainer_step('trainer_plain', plain_args)}
    times: dict[str, list[float]] = {name: [] for name in LOOPS}
    rounds = sizes.warmup + sizes.train_steps
    with tqdm(total=rounds * len(LOOPS), desc='training step', unit='step', disable=not progress, leave=False) as bar:
        for r in range(rounds):
            for name in LOOPS:
                t0 = time.perf_counter()
                steps[name]()
                if r >= sizes.warmup:
                    times[name].append(time.perf_counter() - t0)
                bar.update(1)
    stats = {name: summarize(times[name], sizes.train_batch) for name in LOOPS}
    overhead = _paired(times, 'trainer', 'bare_recipe')
    overhead_plain = _paired(times, 'trainer_plain', 'bare')
    return {
        'model': MODEL, 'depths': list(sizes.depths) if sizes.depths else None, 'batch': sizes.train_batch,
        'rounds': sizes.train_steps, 'warmup_rounds': sizes.warmup,
        'autocast': str(amp_dtype).replace('torch.', '') if amp_dtype else 'off',
        'channels_last': bool(args.channels_last),
        'trainer_extras': {'optimizer': args.opt, 'clip_grad': args.clip_grad, 'clip_mode': args.clip_mode,
                           'model_ema': bool(args.model_ema), 'label_smoothing': args.smoothing,
                           'schedule': f'{args.sched}, per update' if args.sched_on_updates else args.sched},
        'loops': stats, 'times_s': times,
        'patches_per_s': {name: stats[name]['items_per_s'] for name in LOOPS},
        'overhead': overhead, 'overhead_plain': overhead_plain,
        'recipe_extras_cost': _paired(times, 'bare_recipe', 'bare'),
        'trainer_vs_bare': _paired(times, 'trainer', 'bare'),
        'overhead_target': OVERHEAD_TARGET,
        'target_met': max(overhead, overhead_plain) < OVERHEAD_TARGET,
    }


def markdown(section: dict[str, Any], fmt) -> list[str]:
    s = section
    depths = f' depths={tuple(s["depths"])}' if s['depths'] else ''
    extras = s['trainer_extras']
    labels = {'bare': 'bare PyTorch loop', 'bare_recipe': 'bare loop + clipping + EMA',
              'trainer': 'our trainer (default recipe)', 'trainer_plain': 'our trainer, --clip-grad 0 --no-model-ema'}
    lines = [f'{s["model"]}{depths}, batch {s["batch"]}, autocast {s["autocast"]}, channels_last '
             f'{s["channels_last"]}, {extras["optimizer"]}; the default recipe adds gradient clipping '
             f'({extras["clip_mode"]} {extras["clip_grad"]}), EMA ({extras["model_ema"]}) and the LR schedule '
             f'({extras["schedule"]}). Same pre-made batch for all; {s["rounds"]} round-robin rounds after '
             f'{s["warmup_rounds"]} warm-up.', '', '| loop | median step (s) | patches/s |', '| --- | --- | --- |']
    lines += [f'| {labels[name]} | {fmt(s["loops"][name]["median_s"])} | {fmt(s["patches_per_s"][name])} |'
              for name in LOOPS]
    lines += ['', f'Trainer overhead over a bare loop doing the same work (median of per-round ratios): '
                  f'**{s["overhead"]:+.1%}** with the default recipe, **{s["overhead_plain"]:+.1%}** without clipping '
                  f'and EMA (target under {s["overhead_target"]:.0%}: {"met" if s["target_met"] else "not met"}). '
                  f'The recipe\'s clipping + EMA cost {s["recipe_extras_cost"]:+.1%} in any loop; the default '
                  f'trainer step vs the bare loop: {s["trainer_vs_bare"]:+.1%}.', '']
    return lines
