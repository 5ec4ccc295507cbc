"""The PyTorch engine: a torch module on the CPU or a CUDA device, as a `Runner`.

Backends (`benchmarks/backends.py` measures them side by side, with their accuracy cost):

- `eager`: the model as given, NCHW; float32, or under autocast at the requested precision (bf16, fp16).
- `channels_last`: a copy with BatchNorm folded into the convolutions, channels-last memory format (float32, or
  autocast like `eager`).
- `bf16`: as `channels_last`, with bfloat16 weights and activations (AMX tiles, or AVX-512 BF16 on AMD Zen 4 and newer).
- `compile` / `compile_bf16`: `torch.compile` (inductor, frozen weights) of the `channels_last` / `bf16` copy,
  specialised to `batch_size` (shorter batches are zero-padded); compiling a full-size model takes minutes.

`bf16_checked` (bf16 re-checked by `channels_last`) is a `DecisionCheck` over two of these runners
(`timm_inception_pcam.inference.check`). Preprocessing is `preprocess_patches` with the model's mean/std.
"""
import contextlib
import copy
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import UsageError
from ..precision import autocast_dtype, parse_precision
from ..preprocess import batch_slices, check_patches, model_normalization, preprocess_patches
from .base import RunnerSpec, check_normalization, collect_logits, label_names_for, model_name_of

__all__ = ['TORCH_BACKENDS', 'TorchRunner', 'check_model_device', 'fold_batchnorm', 'resolve_device']

TORCH_BACKENDS = ('eager', 'channels_last', 'bf16', 'compile', 'compile_bf16')
BF16_WEIGHTS = ('bf16', 'compile_bf16')


def resolve_device(device: str | torch.device | None) -> torch.device:
    """cpu or cuda[:n] (None: cuda when available); UsageError for anything else or a missing GPU."""
    if device is None or str(device) == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f'device {str(device)!r} not understood: expected cpu or cuda') from e
    if device.type not in ('cpu', 'cuda'):
        raise UsageError(f'device {str(device)!r} not supported: expected cpu or cuda')
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'device {str(device)!r} requested but no CUDA device is available (use --device cpu)')
    return device


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


def check_model_device(model: nn.Module, device: torch.device) -> None:
    """UsageError unless the model's parameters and buffers are on the CPU or on `device`."""
    found = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    if found - {'cpu', device.type}:
        raise UsageError(f'the model has parameters on {sorted(found)}, but device {device} was asked for '
                         f'(move it with model.to({str(device)!r}))')


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


class TorchRunner:
    """A torch module as a Runner: uint8 NHWC patches -> float32 logits, in batches of `batch_size`.

    `precision` is fp32, or bf16 / fp16 run under autocast (`eager`, `channels_last`, `compile`); the `bf16`
    backends cast the weights instead and take only bf16. On the CPU the model must live there; on CUDA it is moved
    to the device (in place for `eager`, which runs the module as given). Backends other than `eager` run an
    optimised copy, leaving the module untouched. `threads` sets torch's intra-op threads while running.
    """

    def __init__(self, model: nn.Module, backend: str = 'eager', *, device: str | torch.device = 'cpu',
                 precision: str = 'fp32', batch_size: int = 64, threads: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, source: str = 'module'):
        if not isinstance(model, nn.Module):
            raise UsageError(f'expected a torch nn.Module, got {type(model).__name__}')
        if backend not in TORCH_BACKENDS:
            raise UsageError(f'torch backend {backend!r} not supported: expected one of {", ".join(TORCH_BACKENDS)}')
        precision = parse_precision(precision, ('fp32', 'bf16', 'fp16'))
        if backend in BF16_WEIGHTS and precision != 'bf16':
            raise UsageError(f'backend {backend} runs bfloat16 weights: precision {precision} asked '
                             f'(use channels_last or eager for {precision})')
        if batch_size < 1:
            raise UsageError(f'batch_size must be at least 1, got {batch_size}')
        if threads is not None and threads < 1:
            raise UsageError(f'threads must be at least 1, got {threads}')
        self.device = resolve_device(device)
        check_model_device(model, self.device)
        default_mean, default_std = model_normalization(model)
        self.mean = check_normalization(default_mean if mean is None else mean, 'mean')
        self.std = check_normalization(default_std if std is None else std, 'std')
        self.num_classes = int(getattr(model, 'num_classes', 2))
        self.batch_size, self.threads = batch_size, threads
        self.channels_last = backend != 'eager'
        self.weight_dtype = torch.bfloat16 if backend in BF16_WEIGHTS else None
        self.autocast = None if self.weight_dtype is not None else autocast_dtype(precision)
        # A compiled graph is specialised to one batch size: shorter batches are zero-padded instead of recompiled.
        self.fixed_batch = batch_size if backend.startswith('compile') else None
        if backend == 'eager':
            net = model.to(self.device).eval()
        else:
            net = fold_batchnorm(model).to(self.device, memory_format=torch.channels_last)
            if self.weight_dtype is not None:
                net = net.to(self.weight_dtype)
            if self.fixed_batch is not None:
                net = torch.compile(net, dynamic=False, options={'freezing': True})
        self.model = net
        self.spec = RunnerSpec(backend=backend, precision=precision, source=source, device=str(self.device),
                               mean=self.mean, std=self.std, label_names=label_names_for(self.num_classes),
                               extra={'model': model_name_of(model), 'torch': torch.__version__})

    def __repr__(self) -> str:
        return (f'TorchRunner(backend={self.spec.backend!r}, device={self.spec.device!r}, '
                f'precision={self.spec.precision!r}, batch_size={self.batch_size})')

    def logits(self, patches: np.ndarray) -> np.ndarray:
        """uint8 (N, 96, 96, 3) NHWC patches -> float32 logits (N, num_classes)."""
        patches = check_patches(patches)
        return collect_logits(lambda s: self._forward(patches[s], s), batch_slices(len(patches), self.batch_size),
                              self.num_classes, f'{self.spec.backend} runner')

    @torch.inference_mode()
    def _forward(self, patches: np.ndarray, s: slice) -> np.ndarray:
        x = torch.from_numpy(preprocess_patches(patches, self.mean, self.std, f'patches {s.start}..{s.stop - 1}'))
        n = x.shape[0]
        if self.fixed_batch is not None and n < self.fixed_batch:
            x = torch.cat([x, x.new_zeros((self.fixed_batch - n, *x.shape[1:]))])
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.weight_dtype is not None:
            x = x.to(self.weight_dtype)
        with _torch_threads(self.threads), torch.autocast(self.device.type, dtype=self.autocast,
                                                          enabled=self.autocast is not None):
            out = self.model(x)
        return out[:n].float().cpu().numpy()

    def close(self) -> None:
        """Drop the module (and its optimised copy); idempotent."""
        self.model = None
