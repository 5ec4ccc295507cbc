"""What the benchmark sections share: the machine record, timing, synthetic data, a model whose outputs vary."""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from timm_inception_pcam.preprocess import batch_slices, preprocess_patches

__all__ = ['Sizes', 'QUICK', 'FULL', 'machine_info', 'interleaved_times', 'summarize', 'synthetic_split',
           'calibrated_model', 'create', 'fmt']


@dataclass(frozen=True)
class Sizes:
    """How much work each section does; `QUICK` is for the smoke test, `FULL` for `make bench` (under 15 min)."""
    quick: bool
    depths: tuple[int, int, int] | None  # None: the paper depths; (1, 1, 1) in quick mode
    batch: int  # the throughput batch
    repeats: int  # timed repeats per measurement (medians are reported)
    warmup: int
    latency_repeats: int  # batch-1 latency repeats
    n_fit: int  # labelled synthetic patches a model is briefly trained on (so that its outputs vary)
    fit_steps: int  # training steps of that calibration
    n_eval: int  # labelled synthetic patches for the accuracy cost of the low-precision paths
    train_batch: int
    train_steps: int  # timed training steps per loop
    compile_models: tuple[str, ...]  # torch.compile takes minutes per full-size model: only these
    onnx: bool
    backend_models: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


QUICK = Sizes(quick=True, depths=(1, 1, 1), batch=8, repeats=2, warmup=1, latency_repeats=2, n_fit=32, fit_steps=2,
              n_eval=32, train_batch=8, train_steps=2, compile_models=(), onnx=True,
              backend_models=('inception_v4_pcam',))
FULL = Sizes(quick=False, depths=None, batch=64, repeats=3, warmup=1, latency_repeats=5, n_fit=384, fit_steps=30,
             n_eval=1024, train_batch=32, train_steps=4, compile_models=('inception_v4_pcam',), onnx=True,
             backend_models=('inception_v4_pcam', 'inception_resnet_v2_pcam'))


def _cpu_model() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What the figures depend on: CPU, cores, threads, ISA, load, library versions."""
    import onnxruntime
    import timm

    from timm_inception_pcam.predict import cpu_has_amx

    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        'cpu': _cpu_model(), 'cores': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
        'cpu_capability': torch.backends.cpu.get_cpu_capability(), 'amx': cpu_has_amx(),
        'load_average_1_5_15': load, 'platform': platform.platform(), 'python': platform.python_version(),
        'torch': torch.__version__, 'timm': timm.__version__, 'onnxruntime': onnxruntime.__version__,
        'numpy': np.__version__, 'cuda_available': torch.cuda.is_available(),
        'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
    }


def interleaved_times(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of every callable, run round-robin (one call each per round) so load drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(times: list[float], items: int = 1) -> dict[str, Any]:
    """Median / min / max seconds per call and the median's items per second."""
    med = statistics.median(times)
    return {'median_s': med, 'min_s': min(times), 'max_s': max(times), 'repeats': len(times),
            'items_per_s': items / med if med > 0 else None}


def synthetic_split(root: Path, n_fit: int, n_eval: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Synthetic PCam written by the data package, read back: {'fit': (uint8 NHWC, labels), 'eval': (...)}."""
    from timm_inception_pcam.data import PCamDataset, synthesize_pcam

    if not (root / 'camelyonpatch_level_2_split_test_y.h5').is_file():
        synthesize_pcam(root, n_fit, seed=seed, n_valid=2, n_test=n_eval)
    out = {}
    for key, split in (('fit', 'train'), ('eval', 'test')):
        ds = PCamDataset(root, split)
        out[key] = ds.read_batch(np.arange(len(ds)))
    return out


def create(name: str, sizes: Sizes, **kwargs: Any) -> nn.Module:
    """A benchmark model: the PCam models at the depths of `sizes`, timm's stock models as they are."""
    import timm

    import timm_inception_pcam  # noqa: F401  (registers the PCam models)

    if name.endswith('_pcam') and sizes.depths is not None:
        kwargs.setdefault('depths', sizes.depths)
    return timm.create_model(name, num_classes=2, **kwargs).eval()


@torch.no_grad()
def _estimate_bn(model: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Re-estimate every BatchNorm's statistics on `x` (cumulative average over the batches)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for s in batch_slices(len(x), batch_size):
        model(x[s])
    model.eval()


def calibrated_model(model: nn.Module, patches: np.ndarray, labels: np.ndarray, *, steps: int, batch_size: int,
                     seed: int = 0, cache: Path | None = None) -> nn.Module:
    """Train a randomly initialised `model` briefly on labelled patches so that its outputs vary meaningfully.

    A random Inception gives near-constant logits, and even with BatchNorm statistics and a classifier fitted its
    input-dependent signal is tiny next to the feature magnitudes: bf16 / int8 rounding would then look far worse
    than on a trained network. So: `steps` updates of our trainer's step (AdamW, label smoothing, clipping, bf16
    autocast on AMX CPUs), then BatchNorm statistics re-estimated on the patches. With `cache` (a file) the weights
    are reused when it exists and written there otherwise.
    """
    if cache is not None and cache.is_file():
        model.load_state_dict(torch.load(cache, map_location='cpu', weights_only=True))
        return model.eval()
    from timm_inception_pcam.io import atomic_path
    from timm_inception_pcam.predict import model_normalization
    from timm_inception_pcam.train import amp_dtype_for, train_one_epoch

    from .training import trainer_setup

    torch.manual_seed(seed)
    x = torch.from_numpy(preprocess_patches(patches, *model_normalization(model)))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    args, optimizer, _, _, loss_fn = trainer_setup(model, batch_size, steps, ema=False)
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(x), generator=g) for _ in range(-(-steps * batch_size // len(x)))])
    batches = [(x[i], y[i]) for i in order[:steps * batch_size].split(batch_size) if len(i) == batch_size]
    if batches:
        train_one_epoch(model, batches, optimizer, loss_fn, args, torch.device('cpu'), 0, 0, len(batches),
                        amp_dtype=amp_dtype_for(torch.device('cpu'), args.amp_dtype), show=False)
    model.to(memory_format=torch.contiguous_format)
    _estimate_bn(model, x, batch_size)
    if cache is not None:
        with atomic_path(cache, suffix='.pt') as tmp:
            torch.save(model.state_dict(), tmp)
    return model


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers to `digits` significant figures, None as a dash."""
    if value is None:
        return '-'
    if isinstance(value, bool):
        return 'yes' if value else 'no'
    if isinstance(value, int):
        return f'{value:,}'
    if isinstance(value, float):
        if value != value:
            return 'nan'
        return f'{value:.{digits}g}' if abs(value) < 10 ** digits else f'{value:,.0f}'
    return str(value)
