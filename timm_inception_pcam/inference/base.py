"""The runner protocol: raw uint8 NHWC patches in, float32 logits out, with a spec saying what runs and how.

Every engine implements it (one module per engine in this package), and everything that scores patches
(the evaluator, slide inference, the benchmarks, the export parity checks) talks to runners only.
"""
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..constants import LABEL_NAMES, PCAM_INPUT_SIZE, PCAM_MEAN, PCAM_STD
from ..errors import InferenceError, UsageError

__all__ = ['Runner', 'RunnerSpec', 'softmax', 'probabilities', 'label_names_for', 'collect_logits',
           'check_normalization', 'model_name_of']


@dataclass(frozen=True)
class RunnerSpec:
    """What a runner runs: its engine (`backend`), numeric precision, input contract and the artefact's origin."""
    backend: str                       # e.g. 'eager', 'channels_last', 'bf16_checked', 'onnxruntime', 'tensorrt'
    precision: str                     # canonical name from timm_inception_pcam.precision ('fp32', 'bf16', ...)
    source: str                        # the file run (checkpoint, .onnx, .plan) or 'module' for an in-memory model
    device: str = 'cpu'
    input_size: tuple[int, int, int] = PCAM_INPUT_SIZE
    mean: tuple[float, float, float] = PCAM_MEAN
    std: tuple[float, float, float] = PCAM_STD
    label_names: tuple[str, ...] = LABEL_NAMES
    extra: dict[str, Any] = field(default_factory=dict)  # engine details worth recording (versions, checks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Runner(Protocol):
    """An engine that scores PCam patches."""

    spec: RunnerSpec

    def logits(self, patches: np.ndarray) -> np.ndarray:
        """uint8 (N, 96, 96, 3) NHWC patches -> float32 (N, num_classes) logits."""
        ...

    def close(self) -> None:
        """Release the engine's resources (idempotent)."""
        ...


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (class probabilities from logits)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def probabilities(runner: Runner, patches: np.ndarray) -> np.ndarray:
    """uint8 (N, 96, 96, 3) NHWC patches -> float32 class probabilities (N, num_classes): softmax of the logits."""
    return softmax(runner.logits(patches).astype(np.float64)).astype(np.float32)


def model_name_of(model: Any) -> str | None:
    """The registered architecture of a timm model (its pretrained_cfg), None for other modules."""
    return (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')


def label_names_for(num_classes: int) -> tuple[str, ...]:
    """PCam's label names for a binary model, generic ones for any other class count."""
    return LABEL_NAMES if num_classes == len(LABEL_NAMES) else tuple(f'class_{i}' for i in range(num_classes))


def collect_logits(run: Callable[[slice], np.ndarray], slices: Iterable[slice], num_classes: int,
                   source: str) -> np.ndarray:
    """Concatenate `run(s)` over batch slices as float32 (N, num_classes), checking every batch's shape."""
    out = []
    for s in slices:
        n = s.stop - s.start
        logits = np.asarray(run(s))
        if logits.shape != (n, num_classes):
            raise InferenceError(f'{source} returned logits of shape {tuple(logits.shape)} for a batch of {n}, '
                                 f'expected ({n}, {num_classes})')
        out.append(logits.astype(np.float32, copy=False))
    return np.concatenate(out) if out else np.zeros((0, num_classes), dtype=np.float32)


def check_normalization(values: Sequence[float], name: str) -> tuple[float, float, float]:
    """`values` as a mean or std (`name`) of the three RGB channels; UsageError unless 3 (positive, for std)."""
    values = tuple(float(v) for v in values)
    if len(values) != 3 or (name == 'std' and min(values) <= 0):
        raise UsageError(f'{name} must be 3 {"positive " if name == "std" else ""}values (RGB), got {list(values)}')
    return values  # type: ignore[return-value]
