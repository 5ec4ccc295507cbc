"""One-command GPU check: environment, the CUDA test subset, training and inference on synthetic PCam, FP16 numerics.

    python -m benchmarks.gpu_check --output DIR [--budget-s 450] [--quick]

Writes DIR/gpu_check.json and DIR/gpu_check.md (each complete or not at all) and exits 1 if any step failed.
Every figure comes from synthetic PCam patches (`timm_inception_pcam.data.synth`), never from PCam itself.
Steps, each timed and recorded (status ok / failed / skipped with the reason):

1. environment: GPU name and memory, driver, CUDA, cuDNN, torch, timm, onnxruntime; TensorRT and pycuda present
   or not (recorded, not a failure);
2. cuda_tests: `pytest -m cuda` (tests/test_cuda.py: the trainer's CUDA step with fp16 autocast + GradScaler and
   with bf16, channels-last, EMA and clipping; the evaluator on CUDA; checkpoints saved on CUDA loaded on CPU);
3. training: both full-size models at batch 256, a few hundred steps each with fp16 + GradScaler then bf16, through
   the trainer's own step: patches/s, peak memory, loss falling, nothing non-finite beyond the scaler's first skips;
4. inference: PyTorch at batch 1 / 64 / 256 / 1024 in fp32, fp16, bf16, fp16 channels-last, torch.compile (batch
   256; max-autotune when the budget leaves 6 minutes, else the default mode) and CUDA graphs: patches/s, latency,
   TFLOP/s and the fraction of the GPU's dense FP16 peak (`benchmarks.gpu.PEAK_FP16_TFLOPS`);
5. fp16_numerics: on the labelled synthetic test patches, the step-3 Inception-v4 in fp16 vs fp32 (decision
   agreement, ROC AUC change), and the same for the FP16 ONNX model `export.fp16` writes, on onnxruntime.

Without a CUDA GPU, step 1 is recorded, steps 2-5 are skipped with the reason and the command exits 0.
`--budget-s` bounds the whole run: a step (or the rest of one) that would start past it is skipped with the reason.
`--quick` uses tiny models and sizes (seconds). `--device cpu` rehearses steps 3-5 on the CPU at whatever size is
asked (for testing this command; CUDA-only parts are skipped there).

On a bare GPU machine without network (Python >= 3.10 and a CUDA build of torch already there), bring:

    # on a machine with network, from the repository root:
    pip wheel --no-deps . -w wheels/                       # this project (timm_inception_pcam, export)
    pip download --no-deps -d wheels/ timm==1.0.31 onnxruntime onnx onnxconverter-common onnxscript h5py \\
        safetensors huggingface-hub scikit-learn tqdm pytest pluggy iniconfig   # whatever the GPU machine lacks
    git archive -o gpu_check_src.tar HEAD benchmarks tests pyproject.toml   # the check and its tests

    # on the GPU machine:
    mkdir -p src && tar -xf gpu_check_src.tar -C src
    pip install --no-deps --target pcam_deps wheels/*.whl
    cd src && PYTHONPATH=$PWD:$PWD/../pcam_deps python -m benchmarks.gpu_check --output ../gpu_check

Bring back DIR/gpu_check.json and DIR/gpu_check.md (they go to benchmarks/results/gpu/).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import logging
import math
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from timm_inception_pcam import errors
from timm_inception_pcam.errors import ArgumentParser, UsageError
from timm_inception_pcam.storage import atomic_path, atomic_write_json

from .common import fmt

__all__ = ['FORMAT', 'STEPS', 'CheckSizes', 'FULL', 'QUICK', 'run_check', 'render_markdown', 'main']

_logger = logging.getLogger(__name__)

FORMAT = 'timm-inception-pcam-gpu-check/1'
STEPS = ('environment', 'cuda_tests', 'training', 'inference', 'fp16_numerics')
MODELS = ('inception_v4_pcam', 'inception_resnet_v2_pcam')
DEFAULT_BUDGET_S = 450.0  # leaves a margin under the 8 minutes this check is meant to take on one H200
COMPILE_MIN_S = 150.0  # torch.compile of a full-size model in the default mode takes one to two minutes
MAX_AUTOTUNE_MIN_S = 360.0  # torch.compile max-autotune takes minutes: only with this much budget left
MAX_SCALER_SKIPS = 8  # fp16 GradScaler steps skipped for inf/NaN gradients while it finds its scale
REPO = Path(__file__).resolve().parents[1]
_CPU_FP16 = 'fp16 kernels are measured on CUDA only (on the CPU they are emulated, minutes per step)'


@dataclass(frozen=True)
class CheckSizes:
    depths: tuple[int, int, int] | None  # None: the full-size models
    n_train: int  # synthetic training patches (cycled through)
    n_eval: int  # labelled synthetic patches for the numerics
    train_batch: int
    train_steps: int
    chunk: int  # steps per loss record
    infer_batches: tuple[int, ...]
    repeats: int
    warmup: int
    compile_batch: int


FULL = CheckSizes(depths=None, n_train=1024, n_eval=512, train_batch=256, train_steps=300, chunk=25,
                  infer_batches=(1, 64, 256, 1024), repeats=20, warmup=3, compile_batch=256)
QUICK = CheckSizes(depths=(1, 1, 1), n_train=64, n_eval=48, train_batch=8, train_steps=24, chunk=4,
                   infer_batches=(1, 4, 16), repeats=2, warmup=1, compile_batch=4)


class Budget:
    """Seconds left of `total` since creation."""

    def __init__(self, total: float) -> None:
        self.total, self.start = total, time.perf_counter()

    def used(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.total - self.used()

    def reason(self, what: str) -> str:
        return f'out of time: {self.used():.0f} s of the {self.total:.0f} s budget used before {what}'


@dataclass
class Context:
    output: Path
    sizes: CheckSizes
    budget: Budget
    device: torch.device | None  # None: no CUDA GPU and no --device
    device_problem: str | None
    compile_mode: str
    quick: bool
    models: dict[str, nn.Module] = field(default_factory=dict)  # trained in step 3, used in step 5
    data: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        return self.output / 'work'

    def sync(self) -> None:
        if self.device is not None and self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)


# ---- step 1 --------------------------------------------------------------------------------------------------------

def _version(module: str) -> str | None:
    try:
        return str(getattr(importlib.import_module(module), '__version__', 'present'))
    except Exception:
        return None


def _driver_version() -> str | None:
    try:
        from cuda.bindings import runtime
        err, version = runtime.cudaDriverGetVersion()
        if err != runtime.cudaError_t.cudaSuccess or not version:
            return None
        return f'{version // 1000}.{version % 1000 // 10}'
    except Exception:
        return None


def step_environment(ctx: Context) -> dict[str, Any]:
    from export.gpu import detect_gpus, pycuda_status, tensorrt_version

    gpus, gpu_problem = detect_gpus()
    trt, trt_problem = tensorrt_version()
    pycuda_problem = pycuda_status()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        'gpus': [{'index': g.index, 'name': g.name, 'compute_capability': g.compute_capability,
                  'memory_gib': round(g.total_memory / 2**30, 1)} for g in gpus],
        'gpu_problem': gpu_problem, 'driver': _driver_version(), 'torch': torch.__version__,
        'torch_cuda': torch.version.cuda, 'torch_cuda_available': torch.cuda.is_available(), 'cudnn': cudnn,
        'timm': _version('timm'), 'onnxruntime': _version('onnxruntime'), 'onnx': _version('onnx'),
        'numpy': np.__version__, 'python': platform.python_version(), 'platform': platform.platform(),
        'tensorrt': trt, 'tensorrt_problem': trt_problem,
        'pycuda': pycuda_problem is None, 'pycuda_problem': pycuda_problem,
        'device_used': str(ctx.device) if ctx.device is not None else None,
        'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
    }


# ---- step 2 --------------------------------------------------------------------------------------------------------

def step_cuda_tests(ctx: Context) -> dict[str, Any]:
    """`pytest -m cuda` in a subprocess, bounded by the budget."""
    if ctx.device is None or ctx.device.type != 'cuda':
        return {'status': 'skipped', 'reason': ctx.device_problem or 'the CUDA tests need a CUDA device'}
    if not (REPO / 'tests' / 'test_cuda.py').is_file():
        return {'status': 'failed', 'reason': f'{REPO / "tests"} has no test_cuda.py: bring the tests folder too'}
    # Only the CUDA test file: collecting the whole suite would need every test dependency on the GPU machine.
    cmd = [sys.executable, '-m', 'pytest', '-m', 'cuda', '-q', '-p', 'no:cacheprovider',
           str(REPO / 'tests' / 'test_cuda.py')]
    timeout = max(10.0, min(ctx.budget.left(), 240.0))
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {'status': 'failed', 'reason': f'pytest -m cuda did not finish within {timeout:.0f} s',
                'command': ' '.join(cmd)}
    summary = (proc.stdout.strip().splitlines() or [''])[-1]
    result = {'command': ' '.join(cmd[2:]), 'returncode': proc.returncode, 'summary': summary,
              'output_tail': proc.stdout[-3000:]}
    if proc.returncode != 0 or 'passed' not in summary:
        result.update(status='failed', reason=f'pytest -m cuda: {summary or proc.stderr[-500:]}')
    return result


# ---- step 3 --------------------------------------------------------------------------------------------------------

def _synthetic(ctx: Context) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Synthetic PCam (train and test splits) written under DIR/work, read back as uint8 NHWC + labels."""
    if not ctx.data:
        from .common import synthetic_split

        ctx.data = synthetic_split(ctx.work / 'synthetic_pcam', ctx.sizes.n_train, ctx.sizes.n_eval)
    return ctx.data


def _create(name: str, sizes: CheckSizes) -> nn.Module:
    import timm

    import timm_inception_pcam  # noqa: F401  (registers the PCam models)

    kwargs = {'depths': sizes.depths} if sizes.depths else {}
    return timm.create_model(name, num_classes=2, **kwargs)


def _batches(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random batches of tensors already on the device (no data loading in the timings)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, len(x), (batch,), generator=g).to(x.device)
        yield x[idx], y[idx]


def _train_run(ctx: Context, name: str, precision: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """The trainer's step (`train_one_epoch`) with its default recipe, in chunks of `sizes.chunk` steps."""
    from timm.utils import NativeScaler

    from timm_inception_pcam.train import train_one_epoch

    from .training import trainer_setup

    sizes, device = ctx.sizes, ctx.device
    torch.manual_seed(0)
    model = _create(name, sizes).to(device)
    # Ten schedule "epochs" over the run: a 10 % warm-up, then the cosine decay, as in a real run.
    args, optimizer, scheduler, ema, loss_fn = trainer_setup(model, sizes.train_batch,
                                                             max(1, sizes.train_steps // 10))
    args.batch_size = sizes.train_batch
    model.to(memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    amp_dtype = torch.float16 if precision == 'fp16' else torch.bfloat16
    scaler = NativeScaler(device=device.type) if precision == 'fp16' else None
    init_scale = scaler._scaler.get_scale() if scaler is not None else None
    loader = _batches(x, y, sizes.train_batch, seed=1)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    losses, seconds, updates = [], [], 0
    for _ in range(math.ceil(sizes.train_steps / sizes.chunk)):
        ctx.sync()
        t0 = time.perf_counter()
        loss, updates = train_one_epoch(model, loader, optimizer, loss_fn, args, device, 0, updates, sizes.chunk,
                                        scheduler=scheduler, ema=ema, scaler=scaler, amp_dtype=amp_dtype, show=False)
        ctx.sync()
        seconds.append(time.perf_counter() - t0)
        losses.append(float(loss))
    timed = seconds[1:] or seconds  # the first chunk holds cuDNN's algorithm search and allocator warm-up
    patches_per_s = sizes.chunk * sizes.train_batch * len(timed) / sum(timed)
    skips = None
    if scaler is not None:  # no growth within 2000 steps: every halving of the scale was a skipped step
        skips = int(round(math.log2(init_scale / scaler._scaler.get_scale())))
    finite = all(math.isfinite(v) for v in losses) and all(bool(torch.isfinite(p).all()) for p in model.parameters())
    head = sum(losses[:2]) / len(losses[:2])
    tail = sum(losses[-2:]) / len(losses[-2:])
    checks = {'loss_decreasing': tail < head, 'finite': finite,
              'scaler_skips_ok': skips is None or skips <= MAX_SCALER_SKIPS}
    if name == MODELS[0]:  # kept (on the CPU) for the numerics of step 5
        ctx.models[f'{name}/{precision}'] = copy.deepcopy(model).float().cpu().eval()
    has_ema = ema is not None
    del model, optimizer, ema
    return {
        'model': name, 'precision': precision, 'autocast': str(amp_dtype).replace('torch.', ''),
        'grad_scaler': scaler is not None, 'channels_last': bool(args.channels_last), 'ema': has_ema,
        'clip_grad': args.clip_grad, 'batch': sizes.train_batch, 'steps': updates,
        'patches_per_s': patches_per_s, 'losses_per_chunk': losses, 'chunk_steps': sizes.chunk,
        'seconds': sum(seconds),
        'peak_memory_gib': torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else None,
        'scaler_skipped_steps': skips, 'final_loss_scale': scaler._scaler.get_scale() if scaler else None,
        'checks': checks,
    }


def step_training(ctx: Context) -> dict[str, Any]:
    if ctx.device is None:
        return {'status': 'skipped', 'reason': ctx.device_problem}
    from timm_inception_pcam.preprocess import preprocess_patches

    patches, labels = _synthetic(ctx)['fit']
    x = torch.from_numpy(preprocess_patches(patches)).to(ctx.device)
    y = torch.from_numpy(labels.astype(np.int64)).to(ctx.device)
    runs, skipped = [], []
    for name in MODELS:
        for precision in ('fp16', 'bf16'):
            if ctx.budget.left() <= 0:
                skipped.append({'model': name, 'precision': precision, 'reason': ctx.budget.reason('this run')})
                continue
            if precision == 'fp16' and ctx.device.type != 'cuda':
                skipped.append({'model': name, 'precision': precision, 'reason': _CPU_FP16})
                continue
            runs.append(_train_run(ctx, name, precision, x, y))
            _logger.info('training %s %s: %.0f patches/s (synthetic)', name, precision, runs[-1]['patches_per_s'])
    failed = [f'{r["model"]} {r["precision"]}: {k}' for r in runs for k, ok in r['checks'].items() if not ok]
    result: dict[str, Any] = {'data': f'synthetic PCam, {len(x)} training patches (cycled)', 'runs': runs,
                              'skipped': skipped}
    if failed:
        result.update(status='failed', reason='checks failed: ' + ', '.join(failed))
    return result


# ---- step 4 --------------------------------------------------------------------------------------------------------

def _cuda_graph(net: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """Replay of one captured forward pass on a static input (warm-up on a side stream, as PyTorch documents)."""
    static = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            net(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        net(static)
    return graph.replay


def _variants(ctx: Context) -> dict[str, tuple[torch.dtype, bool]]:
    """name -> (weights dtype, channels-last)."""
    return {'fp32': (torch.float32, False), 'fp16': (torch.float16, False), 'bf16': (torch.bfloat16, False),
            'fp16_channels_last': (torch.float16, True), 'fp16_compile': (torch.float16, True),
            'fp16_cuda_graph': (torch.float16, True)}


def _compile_mode(ctx: Context) -> str:
    if ctx.compile_mode != 'auto':
        return ctx.compile_mode
    return 'max-autotune' if ctx.budget.left() >= MAX_AUTOTUNE_MIN_S else 'default'


@torch.no_grad()
def _infer_model(ctx: Context, name: str, peak: float | None) -> dict[str, Any]:
    from .gpu import add_flops, time_synced
    from .models import complexity

    sizes, device = ctx.sizes, ctx.device
    torch.manual_seed(0)
    base = _create(name, sizes).eval()
    _, gmacs = complexity(base)
    out: dict[str, Any] = {'model': name, 'gmacs_per_patch': gmacs, 'variants': {}}
    for variant, (dtype, channels_last) in _variants(ctx).items():
        if ctx.budget.left() <= 0:
            out['variants'][variant] = {'status': 'skipped', 'reason': ctx.budget.reason(variant)}
            continue
        if device.type != 'cuda' and dtype == torch.float16:
            out['variants'][variant] = {'status': 'skipped', 'reason': _CPU_FP16}
            continue
        fmt_ = torch.channels_last if channels_last else torch.contiguous_format
        net = copy.deepcopy(base).to(device=device, dtype=dtype, memory_format=fmt_)
        batches = sizes.infer_batches
        extra: dict[str, Any] = {}
        if variant == 'fp16_compile' and ctx.budget.left() < COMPILE_MIN_S:
            out['variants'][variant] = {'status': 'skipped', 'reason': ctx.budget.reason(
                f'torch.compile (it needs about {COMPILE_MIN_S:.0f} s)')}
            continue
        if variant == 'fp16_compile':
            extra['mode'] = _compile_mode(ctx)
            t0 = time.perf_counter()
            net = torch.compile(net, mode=extra['mode'], dynamic=False)
            net(torch.randn(sizes.compile_batch, 3, 96, 96, device=device, dtype=dtype).contiguous(memory_format=fmt_))
            ctx.sync()
            extra['compile_s'] = time.perf_counter() - t0
            batches = (sizes.compile_batch,)
        rows = {}
        for b in batches:
            x = torch.randn(b, 3, 96, 96, device=device, dtype=dtype).contiguous(memory_format=fmt_)
            fn = _cuda_graph(net, x) if variant == 'fp16_cuda_graph' else (lambda x=x, net=net: net(x))
            row = add_flops(time_synced(fn, b, sizes.repeats, sizes.warmup, device), gmacs, peak)
            row['latency_ms'] = row['median_s'] * 1e3
            rows[str(b)] = row
        out['variants'][variant] = {'status': 'ok', 'batches': rows, **extra}
        net = fn = None
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return out


def step_inference(ctx: Context) -> dict[str, Any]:
    if ctx.device is None:
        return {'status': 'skipped', 'reason': ctx.device_problem}
    from .gpu import peak_fp16_tflops

    gpu = torch.cuda.get_device_name(ctx.device) if ctx.device.type == 'cuda' else platform.processor() or 'cpu'
    peak = peak_fp16_tflops(gpu) if ctx.device.type == 'cuda' else None
    result: dict[str, Any] = {'device': gpu, 'peak_fp16_tflops': peak, 'batches': list(ctx.sizes.infer_batches),
                              'tf32_conv': torch.backends.cudnn.allow_tf32, 'input': 'random patches (synthetic)',
                              'models': []}
    for name in MODELS:
        if ctx.budget.left() <= 0:
            result['models'].append({'model': name, 'status': 'skipped', 'reason': ctx.budget.reason(name)})
            continue
        result['models'].append(_infer_model(ctx, name, peak))
    return result


# ---- step 5 --------------------------------------------------------------------------------------------------------

def step_fp16_numerics(ctx: Context) -> dict[str, Any]:
    if ctx.device is None:
        return {'status': 'skipped', 'reason': ctx.device_problem}
    from export.fp16 import convert_fp16, fp16_parity
    from export.onnx import export_onnx
    from export.spec import IOSpec
    from timm_inception_pcam.preprocess import preprocess_patches

    from .backends import accuracy_cost

    name = MODELS[0]
    model = ctx.models.get(f'{name}/fp16') or ctx.models.get(f'{name}/bf16')
    trained = model is not None
    if model is None:
        model = _create(name, ctx.sizes).eval()
    patches, labels = _synthetic(ctx)['eval']
    x = torch.from_numpy(preprocess_patches(patches))

    def logits(net: nn.Module, dtype: torch.dtype) -> np.ndarray:
        net = copy.deepcopy(net).to(device=ctx.device, dtype=dtype).eval()
        with torch.no_grad():
            out = [net(x[i:i + 64].to(ctx.device, dtype)).float().cpu() for i in range(0, len(x), 64)]
        return torch.cat(out).numpy()

    fp32 = logits(model, torch.float32)
    result: dict[str, Any] = {
        'model': name, 'weights': 'trained in step 3 (synthetic PCam)' if trained else
        'random initialisation (step 3 did not run): agreement is not meaningful',
        'patches': f'{len(labels)} labelled synthetic test patches',
        'torch_fp16_vs_fp32': accuracy_cost(fp32, logits(model, torch.float16), labels),
        'logit_margin_std_fp32': float((fp32[:, 1] - fp32[:, 0]).std()),  # near 0: outputs too flat to judge
    }
    if ctx.budget.left() <= 0:
        result['onnx_fp16_vs_fp32'] = {'status': 'skipped', 'reason': ctx.budget.reason('the ONNX export')}
        return result
    onnx_dir = ctx.work / 'onnx'
    onnx_dir.mkdir(parents=True, exist_ok=True)
    cpu_model = copy.deepcopy(model).float().cpu().eval()
    fp32_path, fp16_path = onnx_dir / f'{name}.onnx', onnx_dir / f'{name}.fp16.onnx'
    export_onnx(cpu_model, fp32_path, spec=IOSpec())
    conversion = convert_fp16(fp32_path, fp16_path, patches[:64])
    parity = fp16_parity(fp32_path, fp16_path, patches, labels, source='labelled synthetic test patches')
    result['onnx_fp16_vs_fp32'] = {'conversion': {k: v for k, v in conversion.items() if not isinstance(v, list)},
                                   **parity}
    return result


# ---- driver --------------------------------------------------------------------------------------------------------

STEP_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    'environment': step_environment, 'cuda_tests': step_cuda_tests, 'training': step_training,
    'inference': step_inference, 'fp16_numerics': step_fp16_numerics,
}


def _run_step(name: str, ctx: Context) -> dict[str, Any]:
    if name != 'environment' and ctx.budget.left() <= 0:
        return {'status': 'skipped', 'reason': ctx.budget.reason(f'step {name}'), 'seconds': 0.0}
    t0 = time.perf_counter()
    try:
        result = STEP_FUNCTIONS[name](ctx)
    except Exception as e:  # a failed step is recorded and the next one runs
        _logger.error('step %s failed: %s: %s', name, type(e).__name__, e)
        result = {'status': 'failed', 'reason': f'{type(e).__name__}: {e}',
                  'traceback': traceback.format_exc(limit=8)[-4000:]}
    result.setdefault('status', 'ok')
    result['seconds'] = time.perf_counter() - t0
    return result


def _device(requested: str | None) -> tuple[torch.device | None, str | None]:
    if requested is not None:
        device = torch.device(requested)
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise UsageError(f'--device {requested}: torch has no usable CUDA device here')
        if device.type not in ('cpu', 'cuda'):
            raise UsageError(f'--device {requested}: expected cpu or cuda')
        return device, None
    if torch.cuda.is_available():
        return torch.device('cuda'), None
    from export.gpu import detect_gpus

    gpus, problem = detect_gpus()
    if gpus:
        return None, f'{gpus[0].name} found, but this torch build ({torch.__version__}) has no CUDA'
    return None, f'no CUDA GPU: {problem}'


def run_check(output: Path, *, quick: bool = False, budget_s: float = DEFAULT_BUDGET_S, device: str | None = None,
              compile_mode: str = 'auto', steps: tuple[str, ...] = STEPS) -> dict[str, Any]:
    """Run the steps; returns the record written to gpu_check.json."""
    dev, problem = _device(device)
    ctx = Context(output=output, sizes=QUICK if quick else FULL, budget=Budget(budget_s), device=dev,
                  device_problem=problem, compile_mode=compile_mode, quick=quick)
    ctx.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        'format': FORMAT, 'data': 'synthetic PCam patches (timm_inception_pcam.data.synth); not PCam results',
        'quick': quick, 'sizes': dataclasses.asdict(ctx.sizes), 'budget_s': budget_s,
        'device': str(dev) if dev is not None else None, 'steps': {},
    }
    for name in STEPS:
        if name not in steps:
            results['steps'][name] = {'status': 'skipped', 'reason': 'not selected (--steps)', 'seconds': 0.0}
            continue
        _logger.info('gpu_check: step %s', name)
        results['steps'][name] = _run_step(name, ctx)
        _write(output, results)  # complete files after every step: an interrupted run keeps what it measured
    results['seconds'] = ctx.budget.used()
    results['failed'] = [n for n, s in results['steps'].items() if s['status'] == 'failed']
    _write(output, results)
    return results


def _write(output: Path, results: dict[str, Any]) -> None:
    atomic_write_json(output / 'gpu_check.json', results)
    with atomic_path(output / 'gpu_check.md', suffix='.md') as tmp:
        tmp.write_text(render_markdown(results))


def render_markdown(results: dict[str, Any]) -> str:
    steps = results['steps']
    lines = ['# GPU check (synthetic PCam data)', '',
             f'`python -m benchmarks.gpu_check`{" --quick" if results["quick"] else ""}: device '
             f'{results["device"] or "none"}, budget {results["budget_s"]:.0f} s, '
             f'{results.get("seconds", 0):.0f} s used. All data are synthetic PCam patches, not PCam results.', '',
             '| step | status | seconds | note |', '| --- | --- | --- | --- |']
    for name, step in steps.items():
        lines.append(f'| {name} | {step["status"]} | {step.get("seconds", 0):.1f} | {step.get("reason", "")} |')
    env = steps.get('environment', {})
    if env.get('status') == 'ok':
        gpus = ', '.join(f'{g["name"]} ({g["memory_gib"]} GiB, cc {g["compute_capability"]})' for g in env['gpus'])
        lines += ['', '## Environment', '',
                  f'GPU: {gpus or "none (" + str(env.get("gpu_problem")) + ")"}; driver {env.get("driver") or "-"}; '
                  f'torch {env["torch"]} (CUDA {env.get("torch_cuda") or "-"}, cuDNN {env.get("cudnn") or "-"}); '
                  f'timm {env.get("timm")}; onnxruntime {env.get("onnxruntime")}; TensorRT '
                  f'{env.get("tensorrt") or "absent"}; pycuda {"present" if env.get("pycuda") else "absent"}.']
    tests = steps.get('cuda_tests', {})
    if tests.get('summary'):
        lines += ['', '## CUDA tests', '', f'`{tests["command"]}`: {tests["summary"]}']
    train = steps.get('training', {})
    if train.get('runs'):
        lines += ['', '## Training (synthetic PCam)', '', train['data'], '',
                  '| model | precision | batch | steps | patches/s | peak memory (GiB) | loss first -> last chunk | '
                  'scaler skips | checks |', '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
        for r in train['runs']:
            bad = [k for k, ok in r['checks'].items() if not ok]
            lines.append(f'| {r["model"]} | {r["precision"]} | {r["batch"]} | {r["steps"]} | '
                         f'{fmt(r["patches_per_s"])} | {fmt(r["peak_memory_gib"])} | '
                         f'{fmt(r["losses_per_chunk"][0])} -> {fmt(r["losses_per_chunk"][-1])} | '
                         f'{fmt(r["scaler_skipped_steps"])} | {"ok" if not bad else "FAILED: " + ", ".join(bad)} |')
    infer = steps.get('inference', {})
    if infer.get('models'):
        lines += ['', '## Inference (PyTorch, random input)', '',
                  f'{infer["device"]}, dense FP16 peak {fmt(infer["peak_fp16_tflops"])} TFLOP/s.', '',
                  '| model | variant | batch | patches/s | latency (ms) | TFLOP/s | of FP16 peak |',
                  '| --- | --- | --- | --- | --- | --- | --- |']
        for m in infer['models']:
            for variant, v in m.get('variants', {}).items():
                if v['status'] != 'ok':
                    lines.append(f'| {m["model"]} | {variant} | | {v["status"]}: {v["reason"]} | | | |')
                    continue
                label = f'{variant} ({v["mode"]}, compiled in {v["compile_s"]:.0f} s)' if 'mode' in v else variant
                for b, row in v['batches'].items():
                    util = f'{row["utilisation"]:.1%}' if row.get('utilisation') is not None else '-'
                    lines.append(f'| {m["model"]} | {label} | {b} | {fmt(row["items_per_s"])} | '
                                 f'{fmt(row["latency_ms"])} | {fmt(row["tflops"])} | {util} |')
    num = steps.get('fp16_numerics', {})
    if num.get('torch_fp16_vs_fp32'):
        lines += ['', '## FP16 numerics (labelled synthetic patches)', '', f'{num["model"]}, {num["weights"]}; '
                  f'{num["patches"]}.', '', '| comparison | decision agreement | ROC AUC change | max prob diff |',
                  '| --- | --- | --- | --- |']
        t = num['torch_fp16_vs_fp32']
        lines.append(f'| PyTorch fp16 vs fp32 | {fmt(t["decision_agreement"], 4)} | {fmt(t["roc_auc_change"])} | '
                     f'{fmt(t["max_abs_prob_diff"])} |')
        o = num.get('onnx_fp16_vs_fp32', {})
        if 'decision_agreement' in o:
            lines.append(f'| FP16 ONNX vs FP32 ONNX (onnxruntime) | {fmt(o["decision_agreement"], 4)} | '
                         f'{fmt(o["auc_change"])} | {fmt(o["max_abs_prob_diff"])} |')
    return '\n'.join(lines) + '\n'


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog='python -m benchmarks.gpu_check', description=__doc__.split('\n\n')[0])
    parser.add_argument('--output', type=Path, required=True, help='folder for gpu_check.json and gpu_check.md')
    parser.add_argument('--budget-s', type=float, default=DEFAULT_BUDGET_S,
                        help='time budget of the whole run; later steps are skipped with the reason past it')
    parser.add_argument('--quick', action='store_true', help='tiny models and sizes (a smoke test)')
    parser.add_argument('--device', default=None,
                        help='cuda (default when available) or cpu (rehearses steps 3-5 on the CPU)')
    parser.add_argument('--compile-mode', default='auto',
                        choices=('auto', 'default', 'max-autotune', 'reduce-overhead'),
                        help='torch.compile mode; auto: max-autotune if 6 minutes of budget are left, else default')
    parser.add_argument('--steps', default=','.join(STEPS), help=f'comma-separated subset of {",".join(STEPS)}')
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when no step failed (skipped steps are not failures), 1 otherwise."""
    args = build_parser().parse_args(argv)
    errors.check_range('--budget-s', args.budget_s, 0, low_open=True)
    steps = tuple(s.strip() for s in args.steps.split(',') if s.strip())
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise UsageError(f'--steps: unknown step(s) {", ".join(unknown)}; expected a subset of {", ".join(STEPS)}')
    results = run_check(args.output, quick=args.quick, budget_s=args.budget_s, device=args.device,
                        compile_mode=args.compile_mode, steps=steps)
    counts = {s: sum(1 for r in results['steps'].values() if r['status'] == s) for s in ('ok', 'skipped', 'failed')}
    print(f'gpu_check: {counts["ok"]} ok, {counts["skipped"]} skipped, {counts["failed"]} failed '
          f'({results["seconds"]:.0f} s, synthetic data); wrote {args.output / "gpu_check.json"} and .md')
    return 1 if results['failed'] else 0


if __name__ == '__main__':
    sys.exit(errors.cli(main, 'python -m benchmarks.gpu_check'))
