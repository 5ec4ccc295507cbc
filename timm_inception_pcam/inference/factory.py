"""One factory for every engine: `create_runner(model_or_path, backend, device, precision, ...)` -> a `Runner`.

    runner = create_runner('runs/train/model_best.pth.tar')   # backend 'auto': the fastest correct path here
    logits = runner.logits(patches)                             # uint8 (N, 96, 96, 3) -> float32 (N, 2)
    probs = probabilities(runner, patches)                      # softmax of the logits

What it takes, and what runs it:

- a torch `nn.Module`, or a checkpoint (anything `timm_inception_pcam.checkpoint.load_model` reads: ours, timm
  train.py's, `.safetensors`, `hf-hub:org/name`): `TorchRunner`, `bf16_checked` (`DecisionCheck` of a `bf16`
  runner by a `channels_last` one) or the OpenVINO runners and checks;
- an OpenVINO IR's `.xml` (from `export.openvino`): `OpenVINORunner`, or `openvino_bf16_checked` from the IR alone;
- an `.onnx` file (FP32, or FP16 from `export.fp16`): `OnnxRunner` (onnxruntime, CPU);
- a TensorRT `.plan` / `.engine` with its sidecar: `trt_runner.TrtRunner` (NVIDIA GPU; imported lazily).

`backend='auto'`: on the CPU `auto_cpu_backend()` (`openvino_bf16_checked` where the CPU computes bf16 in hardware
(AMX or AVX-512 BF16) and OpenVINO is installed, `bf16_checked` without OpenVINO, `channels_last` without either),
and for a module whose int8 model is cached here `openvino_cascade` instead (`auto_backend`); `eager` on CUDA;
onnxruntime for an ONNX
file, TensorRT for a plan, the checked OpenVINO bf16 for an IR (its own precision for an int8 one). `precision='auto'`
is the backend's own (fp32 on CUDA: autocast bf16 / fp16 only when asked); an explicit precision picks the CPU
backend for it (fp32: channels_last, bf16: bf16, fp16: eager under autocast). A torch module is never exported
behind the caller's back: to run one on onnxruntime, export it (`export.onnx.export_onnx`) and pass the file.
"""
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..device import cpu_has_native_bf16
from ..errors import CheckpointError, UsageError
from ..precision import PRECISIONS, parse_precision
from .base import Runner
from .check import DEFAULT_SAFETY, DecisionCheck
from .torch_runner import TORCH_BACKENDS, TorchRunner, check_model_device, resolve_device

__all__ = ['BACKENDS', 'ARTEFACT_KINDS', 'artefact_kind', 'resolve', 'resolve_backend', 'auto_backend', 'create_runner']

CHECKED_BACKENDS = ('bf16_checked', 'openvino_bf16_checked', 'openvino_cascade')
OPENVINO_BACKENDS = ('openvino_fp32', 'openvino_bf16', 'openvino_int8')
IR_BACKENDS = OPENVINO_BACKENDS + ('openvino_bf16_checked',)  # what runs an IR file (no cascade: int8 is its own IR)
BACKENDS = TORCH_BACKENDS + OPENVINO_BACKENDS + CHECKED_BACKENDS + ('onnxruntime', 'tensorrt')
ARTEFACT_KINDS = ('module', 'checkpoint', 'onnx', 'tensorrt', 'openvino')
PLAN_SUFFIXES = ('.plan', '.engine')
# the precision a torch backend runs at when none is asked for
_NATURAL = {'bf16': 'bf16', 'compile_bf16': 'bf16', 'bf16_checked': 'bf16', 'openvino_bf16': 'bf16',
            'openvino_bf16_checked': 'bf16', 'openvino_int8': 'int8', 'openvino_cascade': 'int8'}
_FOR_PRECISION = {'fp32': 'channels_last', 'bf16': 'bf16', 'fp16': 'eager'}  # CPU backend 'auto' with a precision


def artefact_kind(model_or_path: Any) -> str:
    """'module' (an nn.Module), 'onnx' (.onnx), 'tensorrt' (.plan / .engine), 'openvino' (an IR's .xml) or
    'checkpoint' (any other path)."""
    if isinstance(model_or_path, nn.Module):
        return 'module'
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise UsageError(f'expected a torch nn.Module or the path of a checkpoint, .onnx file or TensorRT plan, got '
                         f'{type(model_or_path).__name__}')
    suffix = Path(model_or_path).suffix.lower()
    if suffix == '.xml':
        return 'openvino'
    return 'onnx' if suffix == '.onnx' else 'tensorrt' if suffix in PLAN_SUFFIXES else 'checkpoint'


def openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec('openvino') is not None


def auto_cpu_backend() -> str:
    """`auto` on the CPU: the fastest path with float32's decisions that needs no calibration data or set-up.

    Where the CPU computes bf16 in hardware (`cpu_has_native_bf16`: AMX or AVX-512 BF16): OpenVINO bf16 checked in
    float32 where OpenVINO is installed (7.6x / 6.0x eager float32 for v4 / IRv2 in the backends benchmark on a 2-core
    AMX Xeon, about 2x torch's bf16_checked; 2.8x for both on a 2-core AVX-512 BF16 EPYC), else torch's bf16_checked;
    elsewhere bf16 is emulated and slower than float32, so channels_last.

    The `openvino_cascade` is faster still once its int8 model is quantised (8.8x / 7.4x on the AMX Xeon, IRv2 5.3x
    on the EPYC), but quantising takes from 15 s to 4 min per model on a small CPU, and int8 does not always quantise
    well (the EPYC's v4: 31 % of int8 decisions wrong, all caught; the cascade dropped int8 after 320 patches). So
    `auto` never quantises: for a module whose int8 model is already in the OpenVINO cache (an int8
    `export.openvino`, or an explicit `openvino_cascade` or `openvino_int8` run made it), `create_runner` runs the
    cascade instead of `openvino_bf16_checked`, unless a cascade on this CPU found that int8 model costlier than it
    saved (`DecisionCheck.drop_costly_stages`, recorded in the cache): the fastest checked path measured here
    (`auto_backend`). Decisions are float32's either way.
    """
    if not cpu_has_native_bf16():
        return 'channels_last'
    return 'openvino_bf16_checked' if openvino_available() else 'bf16_checked'


def resolve(backend: str = 'auto', kind: str = 'module', device: str = 'cpu',
            precision: str = 'auto') -> tuple[str, str]:
    """(backend, precision) `create_runner` runs for an artefact of `kind` on `device` ('cpu', 'cuda', 'auto').

    For ONNX files and plans the precision is the file's: returned as asked ('auto' unless given).
    """
    if backend not in BACKENDS + ('auto',):
        raise UsageError(f'backend {backend!r} not supported: expected auto or one of {", ".join(BACKENDS)}')
    precision = parse_precision(precision, PRECISIONS + ('auto',))
    if kind == 'onnx':
        if backend not in ('auto', 'onnxruntime'):
            raise UsageError(f'backend {backend!r} does not run ONNX files: an ONNX file runs on onnxruntime '
                             '(backend "auto" or "onnxruntime")')
        return 'onnxruntime', precision
    if kind == 'openvino':
        if backend not in ('auto',) + IR_BACKENDS:
            raise UsageError(f'backend {backend!r} does not run OpenVINO IR files: an .xml runs on OpenVINO (backend '
                             '"auto", openvino_fp32, openvino_bf16 or openvino_bf16_checked; an int8 IR as '
                             'openvino_int8)')
        if backend == 'auto':
            backend = {'bf16': 'openvino_bf16', 'int8': 'openvino_int8', 'fp32': 'openvino_fp32'}.get(precision) or (
                'openvino_bf16_checked' if cpu_has_native_bf16() else 'openvino_fp32')
        return backend, _NATURAL.get(backend, 'fp32') if precision == 'auto' else precision
    if kind == 'tensorrt':
        if backend not in ('auto', 'tensorrt'):
            raise UsageError(f'backend {backend!r} does not run TensorRT plans: a .plan runs on TensorRT '
                             '(backend "auto" or "tensorrt")')
        return 'tensorrt', precision
    if backend == 'onnxruntime':
        raise UsageError('backend onnxruntime runs ONNX files, not torch models: export the model first '
                         '(python -m export.onnx, or export.onnx.export_onnx) and pass the .onnx file')
    if backend == 'tensorrt':
        raise UsageError('backend tensorrt runs TensorRT plans: build one with python -m export.trt and pass the '
                         '.plan file (with its .json sidecar beside it)')
    if precision == 'int8' and backend not in ('auto', 'openvino_int8', 'openvino_cascade'):
        raise UsageError(f'precision int8 runs on OpenVINO (backend openvino_int8 or openvino_cascade) or as a '
                         f'quantised ONNX file, not on backend {backend}')
    on_cuda = str(device) == 'cuda' or str(device).startswith('cuda:') or (
        str(device) == 'auto' and resolve_device('auto').type == 'cuda')
    if backend == 'auto':
        if on_cuda:
            backend = 'eager'
        elif precision == 'auto':
            backend = auto_cpu_backend()
        elif precision == 'int8':
            backend = 'openvino_cascade'
        else:
            backend = _FOR_PRECISION[precision]
    natural = _NATURAL.get(backend, 'fp32')
    if precision == 'auto':
        precision = natural
    elif natural == 'int8' and precision != 'int8':
        raise UsageError(f'backend {backend} runs int8 (checked in float32 for the cascade): precision {precision} '
                         f'asked')
    elif natural == 'bf16' and precision != 'bf16':
        raise UsageError(f'backend {backend} runs bfloat16: precision {precision} asked (use channels_last or eager '
                         f'for {precision})')
    return backend, precision


def resolve_backend(backend: str = 'auto', kind: str = 'module', device: str = 'cpu') -> str:
    """The backend `create_runner` runs for `backend` ('auto' or one of BACKENDS) on this machine."""
    return resolve(backend, kind, device)[0]


def create_runner(
        model_or_path: nn.Module | str | os.PathLike,
        backend: str = 'auto',
        device: str = 'cpu',
        precision: str = 'auto',
        batch_size: int = 64,
        threads: int | None = None,
        thresholds: Sequence[float] = (0.5,),
        *,
        safety: float = DEFAULT_SAFETY,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        model_name: str | None = None,
        use_ema: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        calibration: Any = None,
        calibration_info: dict[str, Any] | None = None,
) -> Runner:
    """The runner for a torch module, a checkpoint, an ONNX file or a TensorRT plan (see the module docstring).

    `device` is 'cpu', 'cuda[:n]' or 'auto' (cuda when available for torch models and plans; onnxruntime runs on
    the CPU). `thresholds` (class-1 probabilities) and `safety` configure `bf16_checked`: decisions at these
    thresholds match float32 (0.5 = argmax); an empty tuple only measures the bf16 error on the first 64 patches.
    `mean`/`std` default to the model's pretrained_cfg (an ONNX file or plan stores its own: they must match it).
    `model_name`, `use_ema` and `model_kwargs` are `load_model`'s, for a checkpoint path. `threads` sets torch's,
    onnxruntime's or OpenVINO's threads while running (default: theirs). `calibration` (uint8 patches, e.g. a
    seeded sample of the training split) calibrates OpenVINO int8 (`openvino_int8`, `openvino_cascade`), with
    `calibration_info` saying what they are; without them a seeded synthetic sample is used (and recorded): the
    cascade's check keeps the decisions float32's either way, a poor calibration only sends more patches on.
    """
    if batch_size < 1:
        raise UsageError(f'batch_size must be at least 1, got {batch_size}')
    if threads is not None and threads < 1:
        raise UsageError(f'threads must be at least 1, got {threads}')
    kind = artefact_kind(model_or_path)
    if kind == 'openvino' and precision == 'auto':
        from .openvino_runner import ir_precision

        precision = 'int8' if ir_precision(Path(model_or_path)) == 'int8' else 'auto'  # an int8 IR runs as int8
    name, precision = resolve(backend, kind, str(device), precision)
    if kind == 'openvino':
        if str(device) not in ('cpu', 'auto'):
            raise UsageError(f'{model_or_path}: an OpenVINO IR runs on the CPU here; device {device!r} asked')
        common = dict(device='cpu', batch_size=batch_size, threads=threads, mean=mean, std=std)
        return _openvino_runner(Path(model_or_path), name, common, thresholds, safety, None, None, False)
    if kind in ('onnx', 'tensorrt'):
        runner = _file_runner(Path(model_or_path), kind, str(device), batch_size, threads)
        _check_file_runner(runner, precision, mean, std)
        return runner
    source = 'module'
    if kind == 'checkpoint':
        from ..checkpoint import load_model

        source = str(model_or_path)
        model_or_path = load_model(model_name, model_or_path, use_ema=use_ema, **(model_kwargs or {}))
    common = dict(device=device if str(device) != 'auto' else resolve_device('auto'), batch_size=batch_size,
                  threads=threads, mean=mean, std=std, source=source)
    if name == 'bf16_checked':
        fast = TorchRunner(model_or_path, 'bf16', precision='bf16', **common)
        exact = TorchRunner(model_or_path, 'channels_last', precision='fp32', **common)
        return DecisionCheck(fast, exact, thresholds, safety, batch_size=batch_size)
    if name.startswith('openvino_'):
        return _openvino_runner(model_or_path, name, common, thresholds, safety, calibration, calibration_info,
                                backend == 'auto')
    return TorchRunner(model_or_path, name, precision=precision, **common)


def auto_backend(model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> str:
    """The backend `create_runner(model)` (backend 'auto', on the CPU) runs for this module here: `resolve`'s, or
    `openvino_cascade` where `auto_cpu_backend` is `openvino_bf16_checked` and this model's int8 is cached here
    (see `auto_cpu_backend`)."""
    from .openvino_runner import weights_sha256

    name = resolve_backend('auto')
    if name == 'openvino_bf16_checked' and _cached_int8(model, weights_sha256(model), tuple(mean) if mean else None,
                                                         tuple(std) if std else None):
        return 'openvino_cascade'
    return name


def _cached_int8(model: nn.Module, digest: str, mean: tuple[float, ...] | None,
                 std: tuple[float, ...] | None) -> str | None:
    from .openvino_runner import cached_int8, module_normalization

    return cached_int8(digest, *module_normalization(model, mean, std))


def _openvino_runner(model: nn.Module | Path, name: str, common: dict[str, Any], thresholds: Sequence[float],
                     safety: float, calibration: Any, calibration_info: dict[str, Any] | None, auto: bool) -> Runner:
    """OpenVINO on the CPU: one precision, bf16 checked in float32, or the int8 -> bf16 -> float32 cascade.

    `model` is a torch module or an IR's .xml. The checks' float32 is OpenVINO's too, compiled for latency: it
    re-runs a handful of patches at a time (at one patch about twice as fast as torch channels_last here). `auto`:
    `openvino_bf16_checked` was `auto`'s choice, which becomes the cascade where its int8 model is cached.
    """
    from .openvino_runner import OpenVINORunner, default_calibration, weights_sha256

    if torch.device(common['device']).type != 'cpu':  # 'auto' was resolved to a device before
        raise UsageError(f'backend {name} runs on the CPU; device {common["device"]!r} asked')
    ov_kwargs: dict[str, Any] = dict(batch_size=common['batch_size'], threads=common['threads'],
                                     mean=tuple(common['mean']) if common['mean'] else None,
                                     std=tuple(common['std']) if common['std'] else None)
    cached_int8 = None  # auto's cascade: the calibration of this model's cached int8
    if isinstance(model, nn.Module):
        check_model_device(model, torch.device('cpu'))
        ov_kwargs['weights_digest'] = weights_sha256(model)  # once for all the runners of a check
        if auto and name == 'openvino_bf16_checked':
            cached_int8 = _cached_int8(model, ov_kwargs['weights_digest'], ov_kwargs['mean'], ov_kwargs['std'])
            name = 'openvino_cascade' if cached_int8 else name
        if name in ('openvino_int8', 'openvino_cascade') and calibration is None and not cached_int8:
            calibration, calibration_info = default_calibration()
    if name in OPENVINO_BACKENDS:
        precision = name.removeprefix('openvino_')
        return OpenVINORunner(model, precision, calibration=calibration if precision == 'int8' else None,
                              calibration_info=calibration_info, **ov_kwargs)
    exact = OpenVINORunner(model, 'fp32', hint='latency', **ov_kwargs)
    stages = [OpenVINORunner(model, 'bf16', **ov_kwargs)]
    if name == 'openvino_cascade':
        try:
            stages.insert(0, OpenVINORunner(model, 'int8', calibration=calibration, calibration_info=calibration_info,
                                            calibration_sha256=cached_int8, **ov_kwargs))
        except UsageError:
            if not cached_int8:
                raise
            name = 'openvino_bf16_checked'  # auto's cached int8 was unreadable (logged, removed): auto as before it
    return DecisionCheck(stages, exact, thresholds, safety, batch_size=common['batch_size'], name=name,
                         on_drop=lambda k, figures: stages[k].record_costly(figures))



def _file_runner(path: Path, kind: str, device: str, batch_size: int, threads: int | None) -> Runner:
    if kind == 'onnx':
        if device not in ('cpu', 'auto'):
            raise UsageError(f'{path}: onnxruntime runs on the CPU here, device {device!r} asked (for the GPU, build '
                             'a TensorRT plan with python -m export.trt)')
        from .onnx_runner import OnnxRunner

        return OnnxRunner(path, batch_size=batch_size, threads=threads)
    if device == 'cpu':
        raise UsageError(f'{path}: a TensorRT plan runs on an NVIDIA GPU: use device cuda (or auto)')
    if not path.is_file():
        raise CheckpointError(f'{path}: no such TensorRT plan')
    from .trt_runner import TrtRunner  # the [trt] extra: tensorrt and pycuda, imported when a runner is made

    return TrtRunner(path)


def _check_file_runner(runner: Runner, precision: str, mean: Sequence[float] | None,
                       std: Sequence[float] | None) -> None:
    """A precision or mean/std asked of a file must be the one it stores."""
    import numpy as np

    spec = runner.spec
    if precision != 'auto' and spec.precision != precision:
        runner.close()
        raise UsageError(f'{spec.source}: the file runs at precision {spec.precision}, but {precision} was asked '
                         '(leave precision auto, or pass the file exported at that precision)')
    for key, given, stored in (('mean', mean, spec.mean), ('std', std, spec.std)):
        if given is not None and (len(given) != 3 or not np.allclose(given, stored, rtol=0, atol=1e-6)):
            runner.close()
            raise UsageError(f'{spec.source}: the file stores preprocessing {key} {list(stored)}, but {key} '
                             f'{list(given)} was given (leave it unset to use the stored one)')
