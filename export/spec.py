"""What an exported model expects and returns: the part of the sidecar contract every runtime shares.

The same description is stored in the ONNX file (metadata key `timm_inception_pcam`) and in the `<plan>.json`
sidecar beside a TensorRT engine, so the onnxruntime and TensorRT runners prepare patches the same way.
"""
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from timm_inception_pcam.constants import LABEL_NAMES, PCAM_INPUT_SIZE, PCAM_MEAN, PCAM_STD
from timm_inception_pcam.errors import DataError
from timm_inception_pcam.inference.base import softmax
from timm_inception_pcam.preprocess import check_patches, preprocess_patches

__all__ = ['ACTIVATIONS', 'IOSpec', 'INPUT_NAME', 'OUTPUT_NAME', 'ONNX_METADATA_KEY', 'softmax']

INPUT_NAME = 'input'
OUTPUT_NAME = 'logits'
ONNX_METADATA_KEY = 'timm_inception_pcam'
RAW_SCALE = 255.0
# What the graph's output is: 'softmax' = logits (the runner's softmax gives probabilities), 'none' = probabilities.
ACTIVATIONS = ('softmax', 'none')


@dataclass(frozen=True)
class IOSpec:
    """Input/output description of an exported PCam classifier.

    `baked_in` True: the graph takes raw uint8 NHWC patches and normalises inside. False: the graph takes float32
    NCHW patches already normalised as (x / 255 - mean) / std, which the runners compute on the host.
    `activation` 'softmax': the graph returns logits; 'none': it returns probabilities (Triton's serving models).
    """
    baked_in: bool = False
    mean: tuple[float, float, float] = PCAM_MEAN
    std: tuple[float, float, float] = PCAM_STD
    label_names: tuple[str, ...] = LABEL_NAMES
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    activation: str = 'softmax'

    def input_dict(self) -> dict[str, Any]:
        c, h, w = PCAM_INPUT_SIZE
        if self.baked_in:
            return {'name': self.input_name, 'shape': [-1, h, w, c], 'dtype': 'uint8', 'layout': 'NHWC'}
        return {'name': self.input_name, 'shape': [-1, c, h, w], 'dtype': 'float32', 'layout': 'NCHW'}

    def output_dict(self) -> dict[str, Any]:
        return {'name': self.output_name, 'shape': [-1, len(self.label_names)], 'dtype': 'float32',
                'activation': self.activation}

    def preprocessing_dict(self) -> dict[str, Any]:
        return {'baked_in': self.baked_in, 'raw_layout': 'NHWC', 'raw_dtype': 'uint8', 'scale': RAW_SCALE,
                'mean': [float(v) for v in self.mean], 'std': [float(v) for v in self.std]}

    def to_dict(self) -> dict[str, Any]:
        return {'input': self.input_dict(), 'output': self.output_dict(),
                'preprocessing': self.preprocessing_dict(), 'label_names': list(self.label_names)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str) -> 'IOSpec':
        """Read the `input` / `output` / `preprocessing` / `label_names` fields, checking them against each other."""
        try:
            pre, inp, out, labels = d['preprocessing'], d['input'], d['output'], d['label_names']
            spec = cls(
                baked_in=bool(pre['baked_in']),
                mean=_triple(pre['mean'], 'preprocessing.mean', source),
                std=_triple(pre['std'], 'preprocessing.std', source),
                label_names=tuple(str(n) for n in labels),
                input_name=str(inp['name']),
                output_name=str(out['name']),
                activation=str(out.get('activation', 'softmax')),
            )
        except (KeyError, TypeError) as e:
            raise DataError(f'{source}: missing or malformed field {e} (expected the timm-inception-pcam '
                             f'input/output/preprocessing/label_names fields)') from None
        if float(pre.get('scale', RAW_SCALE)) != RAW_SCALE:
            raise DataError(f'{source}: preprocessing.scale is {pre.get("scale")}, expected {RAW_SCALE}')
        if spec.activation not in ACTIVATIONS:
            raise DataError(f'{source}: output.activation is {spec.activation!r}, expected one of '
                            f'{", ".join(ACTIVATIONS)}')
        if any(s <= 0 for s in spec.std):
            raise DataError(f'{source}: preprocessing.std must be positive, got {list(spec.std)}')
        for key, found, expected in (
                ('input', inp, spec.input_dict()), ('output', out, spec.output_dict())):
            for k in ('shape', 'dtype') + (('layout',) if key == 'input' else ()):
                if found.get(k) != expected[k]:
                    raise DataError(f'{source}: {key}.{k} is {found.get(k)!r}, expected {expected[k]!r} '
                                     f'(preprocessing.baked_in={spec.baked_in})')
        return spec

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.baked_in else np.float32)

    def prepare(self, patches: np.ndarray, source: str = 'input') -> np.ndarray:
        """Raw uint8 NHWC patches -> the array the graph takes (validated, contiguous)."""
        if self.baked_in:
            return np.ascontiguousarray(check_patches(patches, source))
        return preprocess_patches(patches, self.mean, self.std, source)

    def check_prepared(self, x: np.ndarray, source: str = 'input') -> np.ndarray:
        """Validate an array already in the graph's input layout (for callers that preprocess themselves)."""
        shape = self.input_dict()['shape']
        if not isinstance(x, np.ndarray) or x.ndim != 4 or list(x.shape[1:]) != shape[1:]:
            found = tuple(x.shape) if isinstance(x, np.ndarray) else type(x).__name__
            raise DataError(f'{source}: expected an array of shape (N, {", ".join(map(str, shape[1:]))}) '
                             f'({self.input_dict()["layout"]}), got {found}')
        if x.dtype != self.input_dtype:
            raise DataError(f'{source}: expected dtype {self.input_dtype}, got {x.dtype}')
        return np.ascontiguousarray(x)

    def to_logits(self, output: np.ndarray) -> np.ndarray:
        """The graph's output as logits: probabilities ('none') become their logarithms, whose softmax gives them
        back; logits are returned as they are."""
        if self.activation == 'softmax':
            return output
        with np.errstate(divide='ignore'):
            return np.log(output).astype(np.float32)

    def onnx_metadata(self, **extra: Any) -> str:
        return json.dumps({**self.to_dict(), **extra}, sort_keys=True)


def _triple(values: Sequence[float], name: str, source: str) -> tuple[float, float, float]:
    values = [float(v) for v in values]
    if len(values) != 3:
        raise DataError(f'{source}: {name} must have 3 values (RGB), got {values}')
    return values[0], values[1], values[2]


