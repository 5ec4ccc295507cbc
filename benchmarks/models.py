"""Model cost at 96 px: parameters, GMACs, batch-1 latency and batch throughput (PyTorch eager float32, CPU).

Our two models in both grid variants, timm's stock Inception models at 96 px and resnet50, the common PCam baseline.
GMACs are counted with `torch.utils.flop_counter` (MACs = FLOPs / 2) for one 96x96 patch.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from .common import Sizes, create, interleaved_times, summarize

__all__ = ['MODELS', 'BASELINE', 'complexity', 'run', 'markdown']

# (label, timm name, create_model kwargs)
MODELS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ('inception_v4_pcam', 'inception_v4_pcam', {}),
    ('inception_v4_pcam stem_stride=1', 'inception_v4_pcam', {'stem_stride': 1}),
    ('inception_resnet_v2_pcam', 'inception_resnet_v2_pcam', {}),
    ('inception_resnet_v2_pcam stem_stride=1', 'inception_resnet_v2_pcam', {'stem_stride': 1}),
    ('inception_v4 (timm, stock)', 'inception_v4', {}),
    ('inception_resnet_v2 (timm, stock)', 'inception_resnet_v2', {}),
    ('resnet50 (timm)', 'resnet50', {}),
)
BASELINE = 'resnet50 (timm)'


def complexity(model: nn.Module, input_size: tuple[int, int, int] = (3, 96, 96)) -> tuple[int, float]:
    """(parameters, GMACs per patch) of `model` at `input_size`."""
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, *input_size))
    return params, counter.get_total_flops() / 2e9


@torch.inference_mode()
def run(sizes: Sizes, progress: bool = True) -> dict[str, Any]:
    rows = []
    torch.manual_seed(0)
    for label, name, kwargs in tqdm(MODELS, desc='models', disable=not progress, leave=False):
        model = create(name, sizes, **kwargs)
        params, gmacs = complexity(model)
        x1, xb = torch.randn(1, 3, 96, 96), torch.randn(sizes.batch, 3, 96, 96)
        lat = summarize(interleaved_times({'b1': lambda m=model, x=x1: m(x)}, sizes.latency_repeats,
                                          sizes.warmup)['b1'])
        thr = summarize(interleaved_times({'b': lambda m=model, x=xb: m(x)}, sizes.repeats, sizes.warmup)['b'],
                        sizes.batch)
        rows.append({
            'label': label, 'model': name, 'kwargs': kwargs,
            'depths': list(sizes.depths) if sizes.depths and name.endswith('_pcam') else None,
            'params': params, 'gmacs': gmacs,
            'batch1_latency_ms': lat['median_s'] * 1e3, 'batch1_latency': lat,
            'throughput_per_s': thr['items_per_s'], 'throughput': thr,
            'achieved_gflops': 2 * gmacs * thr['items_per_s'],
        })
        del model
    base = next((r for r in rows if r['label'] == BASELINE), None)
    for r in rows:
        r['throughput_vs_resnet50'] = r['throughput_per_s'] / base['throughput_per_s'] if base else None
        r['latency_vs_resnet50'] = r['batch1_latency_ms'] / base['batch1_latency_ms'] if base else None
    return {'batch': sizes.batch, 'precision': 'float32', 'backend': 'PyTorch eager, NCHW', 'models': rows}


def markdown(section: dict[str, Any], fmt) -> list[str]:
    lines = [f'PyTorch eager float32, 96x96 input; throughput at batch {section["batch"]}; medians over repeats.', '',
             '| model | params (M) | GMACs | batch-1 latency (ms) | batch throughput (patches/s) | vs resnet50 | '
             'achieved GFLOP/s |', '| --- | --- | --- | --- | --- | --- | --- |']
    for r in section['models']:
        label = r['label'] + (f' depths={tuple(r["depths"])}' if r['depths'] else '')
        lines.append(f'| {label} | {r["params"] / 1e6:.2f} | {r["gmacs"]:.2f} | {fmt(r["batch1_latency_ms"])} | '
                     f'{fmt(r["throughput_per_s"])} | {fmt(r["throughput_vs_resnet50"])} | '
                     f'{fmt(r["achieved_gflops"])} |')
    return lines + ['']
