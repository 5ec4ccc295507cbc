"""One inference layer: every engine (PyTorch on CPU or CUDA, onnxruntime, TensorRT, ...) is a `Runner`."""
from .base import Runner, RunnerSpec, softmax

__all__ = ['Runner', 'RunnerSpec', 'softmax']
