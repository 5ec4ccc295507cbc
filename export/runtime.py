"""Run a TensorRT engine from Python (pycuda): raw uint8 NHWC patches in, class probabilities out.

    from export.runtime import TrtRunner
    with TrtRunner('runs/export/inception_v4_pcam.fp16.plan') as runner:
        probs = runner.predict(patches)          # (N, 2), N may exceed the profile's max batch

The plan is loaded only with its sidecar (`<plan>.json`), only if its sha256 matches and only on the TensorRT version
and GPU recorded there. Preprocessing (unless baked into the engine) and batching are the functions the CPU paths use.
tensorrt and pycuda are the optional `[trt]` extra, imported when a runner is created.
"""
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from timm_inception_pcam.preprocess import batch_slices

from .gpu import detect_gpus
from .sidecar import PlanMismatchError, Sidecar, check_compatible, read_sidecar, verify_plan_file
from .spec import softmax

__all__ = ['TrtRunner', 'import_runtime']


def import_runtime() -> tuple[ModuleType, ModuleType]:
    """(tensorrt, pycuda.driver) with a primary CUDA context; a clear ImportError when the extra is missing."""
    missing = []
    try:
        import tensorrt as trt
    except ImportError as e:
        missing.append(f'tensorrt ({e})')
    try:
        import pycuda.autoprimaryctx  # noqa: F401  (retains the device's primary context, shared with TensorRT)
        import pycuda.driver as cuda
    except ImportError as e:
        missing.append(f'pycuda ({e})')
    if missing:
        raise ImportError('the TensorRT runner needs ' + ' and '.join(missing) +
                          ": install the extra with pip install -e '.[trt]' on a machine with an NVIDIA GPU")
    return trt, cuda


class TrtRunner:
    """One engine, one execution context, page-locked host and device buffers sized for the profile's max batch."""

    def __init__(self, plan_path: str | Path, sidecar_path: str | Path | None = None):
        self.plan_path = Path(plan_path)
        self.sidecar: Sidecar = read_sidecar(self.plan_path, sidecar_path)
        plan = verify_plan_file(self.plan_path, self.sidecar)
        gpus, problem = detect_gpus()
        if not gpus:
            raise RuntimeError(f'{self.plan_path}: cannot run a TensorRT engine here: {problem}')
        trt, cuda = import_runtime()
        check_compatible(self.sidecar, trt.__version__, gpus[0].as_sidecar())
        self._trt, self._cuda = trt, cuda
        self.spec = self.sidecar.spec
        self.max_batch = self.sidecar.profile.max
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise PlanMismatchError(f'{self.plan_path}: TensorRT could not deserialize the plan (see the log above)')
        self._check_engine()
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(f'{self.plan_path}: could not create an execution context')
        sample = tuple(self.spec.input_dict()['shape'][1:])
        n_classes = len(self.spec.label_names)
        self._sample_shape = sample
        self._stream = cuda.Stream()
        self._host_in = cuda.pagelocked_empty((self.max_batch, *sample), self.spec.input_dtype)
        self._host_out = cuda.pagelocked_empty((self.max_batch, n_classes), np.float32)
        self._dev_in = cuda.mem_alloc(self._host_in.nbytes)
        self._dev_out = cuda.mem_alloc(self._host_out.nbytes)
        self._context.set_tensor_address(self.spec.input_name, int(self._dev_in))
        self._context.set_tensor_address(self.spec.output_name, int(self._dev_out))

    def _check_engine(self) -> None:
        """The engine's IO tensors and profile must be the ones the sidecar describes."""
        trt, engine, spec = self._trt, self._engine, self.spec
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        expected = {spec.input_name: (trt.TensorIOMode.INPUT, spec.input_dtype),
                    spec.output_name: (trt.TensorIOMode.OUTPUT, np.dtype(np.float32))}
        problems = []
        if sorted(names) != sorted(expected):
            problems.append(f'IO tensors {names}, sidecar says {sorted(expected)}')
        else:
            for name, (mode, dtype) in expected.items():
                found = (engine.get_tensor_mode(name), trt.nptype(engine.get_tensor_dtype(name)))
                if found[0] != mode or np.dtype(found[1]) != np.dtype(dtype):
                    problems.append(f'{name!r} is {found[0]} {np.dtype(found[1])}, sidecar says {mode} '
                                    f'{np.dtype(dtype)}')
            shapes = engine.get_tensor_profile_shape(spec.input_name, 0)
            batches = [int(s[0]) for s in shapes]
            if batches != [self.sidecar.profile.min, self.sidecar.profile.opt, self.sidecar.profile.max]:
                problems.append(f'profile batches {batches}, sidecar says {self.sidecar.profile.as_dict()}')
        if problems:
            raise PlanMismatchError(f'{self.plan_path}: the plan does not match {self.sidecar.path}: '
                                    + '; '.join(problems))

    def logits(self, patches: np.ndarray) -> np.ndarray:
        """Raw uint8 NHWC patches (N, 96, 96, 3) -> float32 logits (N, 2); batches above the profile max are split."""
        x = self.spec.prepare(patches, source=f'{self.plan_path.name} input')
        out = np.empty((len(x), self._host_out.shape[1]), np.float32)
        cuda, context, stream = self._cuda, self._context, self._stream
        for s in batch_slices(len(x), self.max_batch):
            b = s.stop - s.start
            host_in, host_out = self._host_in[:b], self._host_out[:b]
            host_in[...] = x[s]
            cuda.memcpy_htod_async(self._dev_in, host_in, stream)
            if not context.set_input_shape(self.spec.input_name, (b, *self._sample_shape)):
                raise ValueError(f'{self.plan_path}: batch of {b} rejected by the engine profile '
                                 f'{self.sidecar.profile.as_dict()}')
            if not context.execute_async_v3(stream.handle):
                raise RuntimeError(f'{self.plan_path}: execute_async_v3 failed (see the TensorRT log)')
            cuda.memcpy_dtoh_async(host_out, self._dev_out, stream)
            stream.synchronize()
            out[s] = host_out
        return out

    def predict(self, patches: np.ndarray) -> np.ndarray:
        """Class probabilities (N, 2), softmax of the logits as the sidecar's output.activation says."""
        return softmax(self.logits(patches))

    def close(self) -> None:
        """Free device memory, then destroy context, engine and runtime in that order."""
        for name in ('_dev_in', '_dev_out'):
            buf = getattr(self, name, None)
            if buf is not None:
                buf.free()
                setattr(self, name, None)
        for name in ('_context', '_engine', '_runtime'):
            if hasattr(self, name):
                setattr(self, name, None)

    def __enter__(self) -> 'TrtRunner':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
