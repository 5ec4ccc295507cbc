"""GPU inference, when a GPU is present: TensorRT FP16 engine vs PyTorch fp16 vs onnxruntime CUDA at batch 1 / 64 / 256.

The GPU is looked for with `export.gpu.probe` (cuda-python; no TensorRT object is created before a GPU is found).
Without one the section is skipped with the reason. With one, for each model: PyTorch (fp16 weights,
channels_last, CUDA-synchronised), onnxruntime's CUDA provider on the FP32 ONNX model (when onnxruntime-gpu is
installed) and a TensorRT engine built from the mixed-FP16 ONNX model (`export.fp16`, `export.trt`), run by
`timm_inception_pcam.inference.trt_runner.TrtRunner` (host preprocessing and copies included). The ceiling is the
GPU's dense FP16 tensor peak divided by the model's FLOPs per patch; utilisation = achieved FLOP/s / peak.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import Sizes, create, interleaved_times, summarize

__all__ = ['BATCHES', 'PEAK_FP16_TFLOPS', 'peak_fp16_tflops', 'ceiling', 'time_synced', 'add_flops', 'run',
           'markdown']

BATCHES = (1, 64, 256)
MODELS = ('inception_v4_pcam', 'inception_resnet_v2_pcam')
# Dense FP16 tensor-core peaks (TFLOP/s, FP32 accumulate, no sparsity) from the vendors' data sheets, by name fragment.
PEAK_FP16_TFLOPS: tuple[tuple[str, float], ...] = (
    ('H200', 989.0), ('H100 SXM', 989.0), ('H100 NVL', 835.0), ('H100 PCIe', 756.0), ('H100', 756.0),
    ('GH200', 989.0), ('B200', 2250.0), ('L40S', 362.0), ('L40', 181.0), ('L4', 121.0), ('A100', 312.0),
    ('A10G', 70.0), ('A10', 125.0), ('RTX 4090', 165.0), ('T4', 65.0), ('V100', 125.0),
)


def peak_fp16_tflops(gpu_name: str) -> float | None:
    return next((peak for key, peak in PEAK_FP16_TFLOPS if key.lower() in gpu_name.lower()), None)


def ceiling(gmacs: float, peak_tflops: float | None) -> float | None:
    """Patches/s at the FP16 peak: peak FLOP/s / (2 x MACs per patch)."""
    return peak_tflops * 1e12 / (2 * gmacs * 1e9) if peak_tflops and gmacs else None


def time_synced(fn, items: int, repeats: int, warmup: int, device: torch.device | str = 'cuda') -> dict[str, Any]:
    """`summarize`d wall times of `fn`, each call waited for on `device` (CUDA work is asynchronous)."""
    cuda = torch.device(device).type == 'cuda'

    def synced() -> None:
        fn()
        if cuda:
            torch.cuda.synchronize()
    return summarize(interleaved_times({'f': synced}, repeats, warmup)['f'], items)


def add_flops(row: dict[str, Any], gmacs: float, peak_tflops: float | None) -> dict[str, Any]:
    """Adds achieved TFLOP/s (2 FLOPs per MAC) and its fraction of the dense FP16 peak to a `summarize` row."""
    ips = row.get('items_per_s')
    row['tflops'] = 2 * gmacs * 1e9 * ips / 1e12 if ips and gmacs else None
    row['utilisation'] = row['tflops'] / peak_tflops if row['tflops'] and peak_tflops else None
    return row


def _bench_gpu_model(name: str, sizes: Sizes, workdir: Path, gpu, trt_version: str | None,
                     trt_problem: str | None) -> dict[str, Any]:
    from export.fp16 import convert_fp16
    from export.onnx import export_onnx
    from export.spec import IOSpec

    from .models import complexity

    model = create(name, sizes)
    _, gmacs = complexity(model)
    peak = peak_fp16_tflops(gpu.name)
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (max(BATCHES), 96, 96, 3), dtype=np.uint8)
    out: dict[str, Any] = {'model': name, 'gmacs': gmacs, 'peak_fp16_tflops': peak,
                           'ceiling_patches_per_s': ceiling(gmacs, peak), 'runtimes': {}}

    net = model.cuda().half().to(memory_format=torch.channels_last).eval()
    rows = {}
    with torch.inference_mode():
        for b in BATCHES:
            x = torch.randn(b, 3, 96, 96, device='cuda', dtype=torch.half).contiguous(memory_format=torch.channels_last)
            rows[str(b)] = time_synced(lambda x=x: net(x), b, sizes.repeats * 5, sizes.warmup + 2)
    out['runtimes']['pytorch_fp16'] = {'status': 'ok', 'batches': rows}
    model = model.float().cpu()

    fp32 = workdir / f'{name}.gpu.onnx'
    export_onnx(model, fp32, spec=IOSpec())
    import onnxruntime as ort

    if 'CUDAExecutionProvider' in ort.get_available_providers():
        from timm_inception_pcam.preprocess import preprocess_patches

        session = ort.InferenceSession(str(fp32), providers=['CUDAExecutionProvider'])
        x_all = preprocess_patches(patches)
        rows = {str(b): summarize(interleaved_times(
            {'f': lambda b=b: session.run(None, {'input': x_all[:b]})}, sizes.repeats * 5, sizes.warmup + 2)['f'], b)
            for b in BATCHES}
        out['runtimes']['onnxruntime_cuda'] = {'status': 'ok', 'batches': rows}
    else:
        out['runtimes']['onnxruntime_cuda'] = {'status': 'skipped',
                                               'reason': 'onnxruntime-gpu is not installed (no CUDAExecutionProvider)'}

    if trt_version is None:
        out['runtimes']['tensorrt_fp16'] = {'status': 'skipped', 'reason': trt_problem}
    else:
        from export.sidecar import Profile
        from export.trt import build_from_onnx
        from timm_inception_pcam.inference.trt_runner import TrtRunner

        fp16 = workdir / f'{name}.gpu.fp16.onnx'
        convert_fp16(fp32, fp16, patches[:64])
        plan, _ = build_from_onnx(fp16, workdir, gpu, trt_version, profile=Profile(1, 64, 256), workspace_gib=4.0,
                                  opt_level=3)
        with TrtRunner(plan) as runner:
            rows = {str(b): summarize(interleaved_times({'f': lambda b=b: runner.logits(patches[:b])},
                                                        sizes.repeats * 5, sizes.warmup + 2)['f'], b)
                    for b in BATCHES}
        out['runtimes']['tensorrt_fp16'] = {'status': 'ok', 'batches': rows, 'plan': str(plan)}
    for r in out['runtimes'].values():
        for t in r.get('batches', {}).values():
            add_flops(t, gmacs, peak)
    base = out['runtimes']['pytorch_fp16']['batches']
    for r in out['runtimes'].values():
        for b, t in r.get('batches', {}).items():
            t['vs_pytorch_fp16'] = t['items_per_s'] / base[b]['items_per_s']
    return out


def run(sizes: Sizes, workdir: Path, progress: bool = True) -> dict[str, Any]:
    """{'status': 'skipped', 'reason': ...} without a GPU; else the per-model runtimes at each batch."""
    from export.gpu import probe

    env = probe()
    if not env.gpus:
        return {'status': 'skipped', 'reason': env.gpu_problem or 'no CUDA GPU'}
    if not torch.cuda.is_available():
        return {'status': 'skipped', 'reason': f'{env.gpus[0].name} found, but this torch build has no CUDA'}
    if sizes.quick:
        return {'status': 'skipped', 'reason': 'quick mode'}
    workdir.mkdir(parents=True, exist_ok=True)
    gpu = env.gpus[0]
    t0 = time.perf_counter()
    models = [_bench_gpu_model(name, sizes, workdir, gpu, env.tensorrt_version, env.tensorrt_problem)
              for name in MODELS]
    return {'status': 'ok', 'gpu': {'name': gpu.name, 'compute_capability': gpu.compute_capability,
                                    'memory_gib': round(gpu.total_memory / 2**30, 1)},
            'tensorrt': env.tensorrt_version, 'batches': list(BATCHES), 'models': models,
            'seconds': time.perf_counter() - t0}


def markdown(section: dict[str, Any], fmt) -> list[str]:
    if section.get('status') != 'ok':
        return [f'Skipped: {section.get("reason")}.', '']
    g = section['gpu']
    lines = [f'{g["name"]} (compute capability {g["compute_capability"]}), TensorRT {section["tensorrt"] or "-"}.',
             '', '| model | runtime | batch | patches/s | vs PyTorch fp16 | of FP16 peak | ceiling (patches/s) |',
             '| --- | --- | --- | --- | --- | --- | --- |']
    for m in section['models']:
        for runtime, r in m['runtimes'].items():
            if r['status'] != 'ok':
                lines.append(f'| {m["model"]} | {runtime} | | {r["status"]}: {r["reason"]} | | | |')
                continue
            for b, t in r['batches'].items():
                util = f'{t["utilisation"]:.1%}' if t.get('utilisation') is not None else '-'
                lines.append(f'| {m["model"]} | {runtime} | {b} | {fmt(t["items_per_s"])} | '
                             f'{fmt(t["vs_pytorch_fp16"])} | {util} | {fmt(m["ceiling_patches_per_s"])} |')
    return lines + ['']
