"""What the benchmark sections share: the machine record, timing, synthetic data, a trained model."""
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

__all__ = ['DEFAULT_CACHE', 'Sizes', 'QUICK', 'FULL', 'machine_info', 'interleaved_times', 'summarize',
           'synthetic_split', 'trained_model', 'trained_checkpoint', 'create', 'fmt']


DEFAULT_CACHE = Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'timm-inception-pcam' / 'bench'


@dataclass(frozen=True)
class Sizes:
    """How much work each section does; `QUICK` is for the smoke test, `FULL` for `make bench` (under 15 min)."""
    quick: bool
    depths: tuple[int, int, int] | None  # None: the paper depths; (1, 1, 1) in quick mode
    batch: int  # the throughput batch
    repeats: int  # timed repeats per measurement (medians are reported)
    warmup: int
    latency_repeats: int  # batch-1 latency repeats
    n_fit: int  # synthetic training patches of the backend section's models (`trained_model`)
    fit_epochs: int  # their training epochs
    n_eval: int  # labelled synthetic patches for the accuracy cost of the low-precision paths
    train_batch: int
    train_steps: int  # timed round-robin rounds of training steps (one step per loop each)
    compile_models: tuple[str, ...]  # torch.compile takes minutes per full-size model: only these
    onnx: bool
    backend_models: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


QUICK = Sizes(quick=True, depths=(1, 1, 1), batch=8, repeats=2, warmup=1, latency_repeats=2, n_fit=64, fit_epochs=2,
              n_eval=32, train_batch=8, train_steps=2, compile_models=(), onnx=True,
              backend_models=('inception_v4_pcam',))
FULL = Sizes(quick=False, depths=None, batch=64, repeats=3, warmup=1, latency_repeats=5, n_fit=512, fit_epochs=2,
             n_eval=1024, train_batch=32, train_steps=10, compile_models=('inception_v4_pcam',), onnx=True,
             backend_models=('inception_v4_pcam', 'inception_resnet_v2_pcam'))


def machine_info() -> dict[str, Any]:
    """What the figures depend on: CPU, cores, threads, ISA, load, library versions."""
    import onnxruntime
    import timm

    from timm_inception_pcam.device import cpu_has_amx, cpu_has_avx512_bf16, cpu_model_name

    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        'cpu': cpu_model_name(), 'cores': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
        'cpu_capability': torch.backends.cpu.get_cpu_capability(), 'amx': cpu_has_amx(),
        'avx512_bf16': cpu_has_avx512_bf16(),
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


def trained_model(name: str, sizes: Sizes, workdir: Path, cache_dir: Path | None = None,
                  progress: bool = True) -> tuple[nn.Module, str]:
    """`name` trained the way the main job (`timm_inception_pcam.pipeline`, `make demo`) trains it, and a description.

    See `trained_checkpoint`; this loads it.
    """
    from timm_inception_pcam.checkpoint import load_model

    checkpoint, description = trained_checkpoint(name, sizes, workdir, cache_dir, progress)
    return load_model(None, checkpoint), description


def trained_checkpoint(name: str, sizes: Sizes, workdir: Path, cache_dir: Path | None = None,
                       progress: bool = True) -> tuple[Path, str]:
    """The checkpoint of `name` trained the way the main job trains it, and a description.

    A synthetic sample like the main job's (`sizes.n_fit` training patches, seed 0), our trainer with the main job's
    recipe (random initialisation, `sizes.fit_epochs` epochs, best validation checkpoint). Accuracy costs are only
    meaningful on a model that has learnt something: a random Inception's logits hardly vary, and a few optimiser
    steps leave a model whose own float32 decisions flip under sub-grey-level input noise. With `cache_dir` the
    checkpoint is kept there and reused by the next run.
    """
    import shutil

    from timm_inception_pcam.data import synthesize_pcam
    from timm_inception_pcam.pipeline import PipelineConfig, train_config
    from timm_inception_pcam.storage import atomic_path
    from timm_inception_pcam.train import train

    model_kwargs = {'depths': sizes.depths} if name.endswith('_pcam') and sizes.depths is not None else {}
    args = PipelineConfig(model=name, model_kwargs=model_kwargs, n_train=sizes.n_fit,
                          n_eval=max(16, sizes.n_fit // 2), epochs=sizes.fit_epochs, batch_size=sizes.train_batch,
                          workers=0, progress=progress)
    depths = 'x'.join(map(str, sizes.depths)) if sizes.depths else 'full'
    recipe = (f'trained by the main job\'s recipe: {args.epochs} epochs x {args.n_train} synthetic patches, batch '
              f'{args.batch_size}, lr {args.lr}, random init')
    cache = cache_dir / f'{name}-{depths}-demo-n{args.n_train}-e{args.epochs}-b{args.batch_size}.pth' \
        if cache_dir else None
    if cache is not None and cache.is_file():
        return cache, f'{recipe} (checkpoint reused from {cache})'
    data_dir = workdir / f'train-{name}' / 'data'
    synthesize_pcam(data_dir, n=args.n_train, seed=args.seed, n_valid=args.n_eval, n_test=2)
    summary = train(train_config(args, data_dir, workdir / f'train-{name}' / 'run'))
    best = Path(summary.best_checkpoint or summary.last_checkpoint)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache, suffix='.pth') as tmp:
            shutil.copyfile(best, tmp)
    return best, f'{recipe}, best validation ROC AUC {summary.best_metric:.3f}'


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
