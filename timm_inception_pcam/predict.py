"""Fast CPU inference: raw uint8 PCam patches in, class probabilities out.

    predictor = create_predictor(model)            # backend 'auto': the fastest correct CPU path for this machine
    probs = predictor(patches)                     # uint8 (N, 96, 96, 3) -> float32 (N, num_classes), softmax

Backends (all on the CPU; `benchmarks/backends.py` measures them side by side, with their accuracy cost):

- `eager`: the model as given, float32, NCHW; the baseline.
- `channels_last`: a copy with BatchNorm folded into the convolutions, channels-last memory format, float32.
- `bf16`: as `channels_last`, with bfloat16 weights and activations (AMX tiles on Sapphire Rapids and newer).
- `bf16_checked`: `bf16`, then every patch whose decision bfloat16 rounding could have flipped is run again in
  float32 (`channels_last`) and takes the float32 logits, so decisions at the predictor's `thresholds` match float32.
  "Could have flipped": its class-1 logit margin lies within `safety` x (the 90th percentile of the bf16-vs-float32
  margin errors measured so far) of a threshold. The first batch runs both ways in full to measure them, and every
  re-checked patch is one more measurement. See `DecisionCheck`.
- `compile` / `compile_bf16`: `torch.compile` (inductor, frozen weights) of the `channels_last` / `bf16` copy,
  specialised to `batch_size` (shorter batches are zero-padded); compiling a full-size model takes minutes.
- `onnxruntime`: onnxruntime's CPU provider on an ONNX file (a model given as a module is exported first).

`auto` picks `bf16_checked` on CPUs with AMX (plain `bf16` measured about 5x eager float32 but changed up to 1 % of
decisions; see benchmarks/results) and `channels_last` elsewhere (bf16 without AMX is emulated and slower than
float32); an ONNX file always runs on onnxruntime. Preprocessing is `preprocess_patches`, shared with the other
runtimes.
"""
from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .constants import PCAM_NUM_CLASSES
from .device import cpu_has_amx
from .preprocess import batch_slices, check_patches, model_normalization, preprocess_patches

__all__ = ['BACKENDS', 'TORCH_BACKENDS', 'DEFAULT_SAFETY', 'DecisionCheck', 'class1_margin', 'mean_prob_bounds',
           'straddling', 'undecided', 'Predictor', 'create_predictor', 'resolve_backend', 'fold_batchnorm',
           'model_normalization', 'cpu_has_amx']

TORCH_BACKENDS = ('eager', 'channels_last', 'bf16', 'bf16_checked', 'compile', 'compile_bf16')
BACKENDS = TORCH_BACKENDS + ('onnxruntime',)
DEFAULT_SAFETY = 4.0
ERROR_QUANTILE = 0.9
ERROR_HISTORY = 8192  # measurements kept (the most recent): a slide of a million tiles must not grow them unbounded


def resolve_backend(backend: str = 'auto', onnx_file: bool = False) -> str:
    """The backend `create_predictor` runs for `backend` ('auto' or one of BACKENDS) on this CPU."""
    if backend not in BACKENDS + ('auto',):
        raise ValueError(f'backend {backend!r} not supported: expected auto or one of {", ".join(BACKENDS)}')
    if onnx_file:
        if backend not in ('auto', 'onnxruntime'):
            raise ValueError(f'backend {backend!r} runs torch modules; an ONNX file runs on onnxruntime '
                             '(backend "auto" or "onnxruntime")')
        return 'onnxruntime'
    if backend == 'auto':
        return 'bf16_checked' if cpu_has_amx() else 'channels_last'
    return backend


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every conv-norm pair (timm's ConvNormAct: `.conv` then `.bn`) folded.

    The BatchNorm's activation and dropout (timm's BatchNormAct2d) are kept; other modules are left as they are.
    """
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        conv, bn = getattr(module, 'conv', None), getattr(module, 'bn', None)
        if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
                and bn.running_mean is not None):
            continue
        module.conv = fuse_conv_bn_eval(conv, bn)
        tail = [m for m in (getattr(bn, 'drop', None), getattr(bn, 'act', None)) if m is not None]
        module.bn = nn.Sequential(*tail) if tail else nn.Identity()
    return model


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _TorchRunner:
    """Normalised float32 NCHW batch -> float32 logits with one of the torch backends."""

    def __init__(self, model: nn.Module, backend: str, threads: int | None, batch_size: int):
        self.threads = threads
        self.channels_last = backend != 'eager'
        self.dtype = torch.bfloat16 if backend.endswith('bf16') else None
        # A compiled graph is specialised to one batch size: shorter batches are zero-padded instead of recompiled.
        self.fixed_batch = batch_size if backend.startswith('compile') else None
        if backend == 'eager':
            self.model = model.eval()
            return
        net = fold_batchnorm(model).to(memory_format=torch.channels_last)
        if self.dtype is not None:
            net = net.to(self.dtype)
        self.model = net if self.fixed_batch is None else torch.compile(net, dynamic=False, options={'freezing': True})

    @torch.inference_mode()
    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        t = torch.as_tensor(x)
        if self.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        if self.dtype is not None:
            t = t.to(self.dtype)
        n = t.shape[0]
        if self.fixed_batch is not None and n < self.fixed_batch:
            t = torch.cat([t, t.new_zeros((self.fixed_batch - n, *t.shape[1:]))]).contiguous(
                memory_format=torch.channels_last)
        with _torch_threads(self.threads):
            return self.model(t)[:n].float().numpy()


def class1_margin(logits: np.ndarray) -> np.ndarray:
    """Class-1 logit margin (logit 1 - logit 0) of (N, 2) logits, in float64: sigmoid of it is the softmax's p1."""
    logits = np.asarray(logits, dtype=np.float64)
    return logits[..., 1] - logits[..., 0]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def mean_prob_bounds(margins: np.ndarray, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi): the range of ``mean over views of sigmoid(margin)`` when every view's margin may be off by `bound`.

    `margins` is (N,) or (views, N) class-1 logit margins.
    """
    m = np.asarray(margins, dtype=np.float64)
    m = m[None] if m.ndim == 1 else m
    return _sigmoid(m - bound).mean(axis=0), _sigmoid(m + bound).mean(axis=0)


def straddling(lo: np.ndarray, hi: np.ndarray, thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """Which intervals [lo_i, hi_i] hold a threshold t with lo_i < t <= hi_i: whose decision ``p >= t`` is open."""
    t = np.sort(np.asarray(thresholds, dtype=np.float64).ravel())
    nxt = np.searchsorted(t, lo, side='right')  # the first threshold above each lower bound
    out = nxt < len(t)
    out[out] = t[nxt[out]] <= hi[out]
    return out


def undecided(margins: np.ndarray, thresholds: Sequence[float], bound: float) -> np.ndarray:
    """Which patches an error of up to `bound` in every view's class-1 logit margin could move across a threshold.

    `margins` is (N,) or (views, N); a patch's decision is ``mean over views of sigmoid(margin) >= t`` (the
    evaluator averages test-time-augmentation probabilities). A NaN margin counts as undecided; +-inf as decided.
    """
    lo, hi = mean_prob_bounds(margins, bound)
    nan = np.isnan(np.asarray(margins, dtype=np.float64)).reshape(-1, len(lo)).any(axis=0)
    return nan | straddling(lo, hi, thresholds)


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(t) for t in thresholds)
    if any(not 0.0 < t < 1.0 for t in values):
        raise ValueError(f'decision thresholds must be probabilities strictly between 0 and 1, got {list(values)}')
    return values


class DecisionCheck:
    """The `bf16_checked` runner: bf16 logits, replaced by float32 ones for every patch whose decision is in doubt.

    In doubt: `undecided` at `thresholds` with bound = `safety` x the `ERROR_QUANTILE` quantile of the |bf16 -
    float32| class-1 margin errors measured so far. The first batch is run both ways in full (the first
    measurements); each re-checked patch is a further one, so the bound follows the model and the data. A quantile,
    not the maximum: on briefly trained models the largest errors (up to 17 logits, 4 % relative) come from patches
    whose margins are in the hundreds, nowhere near a threshold, and a maximum would send every patch to float32.
    `exact` is also what the evaluator calls to settle the patches in doubt at a threshold it only chooses later
    (`timm_inception_pcam.evaluate.Settler`). Non-finite bf16 logits are always re-run.
    """

    def __init__(self, fast: Callable[[torch.Tensor], np.ndarray], exact: Callable[[torch.Tensor], np.ndarray],
                 thresholds: Sequence[float], safety: float = DEFAULT_SAFETY):
        if not safety >= 1.0:
            raise ValueError(f'safety must be at least 1 (a multiple of the measured bf16 error), got {safety}')
        self.fast, self.exact, self.safety = fast, exact, float(safety)
        self.thresholds = _check_thresholds(thresholds)
        self.errors = np.zeros(0)  # |bf16 - float32| class-1 margin errors, the last ERROR_HISTORY measured
        self.largest_error = 0.0
        self._bound: float | None = None  # cached until the next measurement
        self.patches = self.rechecked = 0

    @property
    def bound(self) -> float:
        """Margin error assumed for a patch that was not re-checked (infinite before the first measurement)."""
        if not len(self.errors):
            return float('inf')
        if self._bound is None:
            self._bound = self.safety * float(np.quantile(self.errors, ERROR_QUANTILE))
        return self._bound

    def observe(self, fast: np.ndarray, exact: np.ndarray) -> None:
        err = np.abs(class1_margin(fast) - class1_margin(exact))
        err = err[np.isfinite(err)]
        self.errors = np.concatenate([self.errors, err])[-ERROR_HISTORY:]
        self.largest_error = max(self.largest_error, float(err.max(initial=0.0)))
        self._bound = None

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        x = torch.as_tensor(x)
        logits = self.fast(x)
        if not len(self.errors):
            doubt = np.arange(len(logits))
        else:
            margin = class1_margin(logits)
            doubt = np.flatnonzero(undecided(margin, self.thresholds, self.bound) | ~np.isfinite(margin))
        if len(doubt):
            exact = self.exact(x[torch.from_numpy(doubt)])
            self.observe(logits[doubt], exact)
            logits[doubt] = exact
        self.patches += len(logits)
        self.rechecked += len(doubt)
        return logits

    def stats(self) -> dict[str, Any]:
        """What was checked: patches, re-checked patches and fraction, the measured errors and the bound used."""
        measured = len(self.errors) > 0
        return {'thresholds': list(self.thresholds), 'safety': self.safety, 'error_quantile': ERROR_QUANTILE,
                'patches': self.patches, 'rechecked': self.rechecked,
                'rechecked_fraction': self.rechecked / self.patches if self.patches else None,
                'margin_error_median': float(np.median(self.errors)) if measured else None,
                'margin_error_max': self.largest_error if measured else None,
                'bound': self.bound if measured else None}


class _OnnxRunner:
    """Graph input (normalised float32 NCHW, or uint8 NHWC when preprocessing is baked in) -> float32 logits."""

    def __init__(self, path: Path, threads: int | None, batch_size: int):
        from export.onnx import OnnxRunner

        self.runner = OnnxRunner(path, batch_size=batch_size, threads=threads)
        self.spec = self.runner.spec

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        x = np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x)
        x = self.spec.check_prepared(x, source=str(self.runner.path))
        return self.runner.session.run([self.spec.output_name], {self.spec.input_name: x})[0].astype(np.float32)


class Predictor:
    """Batches raw patches through a backend. Call with uint8 NHWC patches for softmax probabilities."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], prepare: Callable[[np.ndarray, str], np.ndarray],
                 *, backend: str, batch_size: int, mean: Sequence[float], std: Sequence[float], num_classes: int,
                 takes_normalized: bool = True):
        self._run, self._prepare = run, prepare
        self.check = run if isinstance(run, DecisionCheck) else None
        self.backend, self.batch_size, self.num_classes = backend, batch_size, num_classes
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.takes_normalized = takes_normalized

    def __repr__(self) -> str:
        return (f'Predictor(backend={self.backend!r}, batch_size={self.batch_size}, num_classes={self.num_classes}, '
                f'mean={self.mean}, std={self.std})')

    def predict_logits(self, patches: np.ndarray) -> np.ndarray:
        """uint8 (N, 96, 96, 3) patches -> float32 logits (N, num_classes)."""
        patches = check_patches(patches)
        out = [self._checked(self._run(self._prepare(patches[s], f'patches {s.start}..{s.stop - 1}')), s.stop - s.start)
               for s in batch_slices(len(patches), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), dtype=np.float32)

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """uint8 (N, 96, 96, 3) patches -> float32 softmax probabilities (N, num_classes)."""
        logits = torch.from_numpy(self.predict_logits(patches))
        return torch.softmax(logits, dim=1).numpy()

    def logits(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Float32 NCHW patches already normalised with this predictor's mean/std -> float32 logits (N, C).

        The evaluator's backend signature: it normalises (and applies test-time augmentation) itself.
        """
        if not self.takes_normalized:
            raise ValueError(f'this {self.backend} model has its preprocessing baked in: it takes raw uint8 NHWC '
                             'patches (call the predictor), not normalised float32 NCHW batches')
        x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
        if x.ndim != 4 or x.dtype != torch.float32:
            raise ValueError(f'expected a float32 NCHW batch, got shape {tuple(x.shape)} and dtype {x.dtype}')
        out = [self._checked(self._run(x[s]), s.stop - s.start) for s in batch_slices(len(x), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), dtype=np.float32)

    def _checked(self, logits: np.ndarray, n: int) -> np.ndarray:
        if logits.shape != (n, self.num_classes):
            raise ValueError(f'{self.backend} backend returned logits of shape {tuple(logits.shape)} for a batch of '
                             f'{n}, expected ({n}, {self.num_classes})')
        return logits


def _check_norm(values: Sequence[float], name: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3 or (name == 'std' and min(values) <= 0):
        raise ValueError(f'{name} must be 3 {"positive " if name == "std" else ""}values (RGB), got {list(values)}')
    return values  # type: ignore[return-value]


def create_predictor(
        model: nn.Module | str | Path,
        backend: str = 'auto',
        batch_size: int = 64,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        threads: int | None = None,
        thresholds: Sequence[float] = (0.5,),
        safety: float = DEFAULT_SAFETY,
) -> Predictor:
    """A CPU predictor for a torch model or an ONNX file (str / Path, run on onnxruntime).

    `mean`/`std` default to the model's pretrained_cfg (for an ONNX file: its stored preprocessing, which they must
    match if given). `threads` sets torch's / onnxruntime's intra-op threads while predicting (default: theirs).
    A torch model must live on the CPU; backends other than `eager` run an optimised copy, leaving it untouched.
    `thresholds` (class-1 probabilities) and `safety` configure `bf16_checked` (see `DecisionCheck`): decisions at
    these thresholds match float32 (0.5 = argmax); an empty tuple only measures the bf16 error on the first batch.
    """
    if batch_size < 1:
        raise ValueError(f'batch_size must be at least 1, got {batch_size}')
    if threads is not None and threads < 1:
        raise ValueError(f'threads must be at least 1, got {threads}')
    if isinstance(model, (str, Path)):
        return _onnx_predictor(Path(model), resolve_backend(backend, onnx_file=True), batch_size, mean, std, threads)
    if not isinstance(model, nn.Module):
        raise TypeError(f'model must be a torch nn.Module or the path of an ONNX file, got {type(model).__name__}')
    devices = {p.device.type for p in model.parameters()}
    if devices - {'cpu'}:
        raise ValueError(f'create_predictor is the CPU path: the model has parameters on {sorted(devices)}; '
                         'move it with model.cpu()')
    name = resolve_backend(backend)
    default_mean, default_std = model_normalization(model)
    mean = _check_norm(default_mean if mean is None else mean, 'mean')
    std = _check_norm(default_std if std is None else std, 'std')
    num_classes = int(getattr(model, 'num_classes', PCAM_NUM_CLASSES))
    if name == 'onnxruntime':
        from export.onnx import export_onnx
        from export.spec import IOSpec

        with tempfile.TemporaryDirectory(prefix='pcam-predict-') as tmp:
            path = export_onnx(model, Path(tmp) / 'model.onnx', spec=IOSpec(mean=mean, std=std))
            return _onnx_predictor(path, name, batch_size, None, None, threads)

    def prepare(patches: np.ndarray, source: str) -> np.ndarray:
        return preprocess_patches(patches, mean, std, source)

    runner: Callable[[np.ndarray], np.ndarray]
    if name == 'bf16_checked':
        if num_classes != 2:
            raise ValueError(f'backend bf16_checked checks binary decisions; this model has {num_classes} classes '
                             '(use bf16 or channels_last)')
        runner = DecisionCheck(_TorchRunner(model, 'bf16', threads, batch_size),
                               _TorchRunner(model, 'channels_last', threads, batch_size), thresholds, safety)
    else:
        runner = _TorchRunner(model, name, threads, batch_size)
    return Predictor(runner, prepare, backend=name, batch_size=batch_size, mean=mean, std=std, num_classes=num_classes)


def _onnx_predictor(path: Path, backend: str, batch_size: int, mean: Sequence[float] | None,
                    std: Sequence[float] | None, threads: int | None) -> Predictor:
    if not path.is_file():
        raise FileNotFoundError(f'{path}: no such ONNX file')
    runner = _OnnxRunner(path, threads, batch_size)
    spec = runner.spec
    for name, given, stored in (('mean', mean, spec.mean), ('std', std, spec.std)):
        if given is not None and not np.allclose(_check_norm(given, name), stored, rtol=0, atol=1e-6):
            raise ValueError(f'{path}: the file stores preprocessing {name} {list(stored)}, but {name} '
                             f'{list(given)} was given (leave it unset to use the stored one)')
    return Predictor(runner, spec.prepare, backend=backend, batch_size=batch_size, mean=spec.mean, std=spec.std,
                     num_classes=len(spec.label_names), takes_normalized=not spec.baked_in)
