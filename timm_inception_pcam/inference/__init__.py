"""One inference layer: every engine (PyTorch on CPU or CUDA, onnxruntime, TensorRT, ...) is a `Runner`.

    from timm_inception_pcam.inference import create_runner, probabilities
    runner = create_runner('model_best.pth.tar')       # or an nn.Module, an .onnx file, a TensorRT .plan
    logits = runner.logits(patches)                     # uint8 (N, 96, 96, 3) NHWC -> float32 (N, 2)

Modules: `base` (the protocol), `torch_runner`, `onnx_runner`, `check` (bf16 with float32 decisions, the
evaluator's Settler), `tta` (dihedral views of uint8 patches, for any runner), `factory` (`create_runner`).
"""
from .base import Runner, RunnerSpec, probabilities, softmax
from .factory import BACKENDS, create_runner

__all__ = ['Runner', 'RunnerSpec', 'softmax', 'probabilities', 'BACKENDS', 'create_runner']
