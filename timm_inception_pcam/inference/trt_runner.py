"""Run a TensorRT engine from Python (pycuda): raw uint8 NHWC patches in, class probabilities out.

    from timm_inception_pcam.inference.trt_runner import TrtRunner
    with TrtRunner('runs/export/inception_v4_pcam.fp16.plan') as runner:
        probs = runner.predict(patches)          # (N, 2), N may exceed the profile's max batch or be below its min

The plan is loaded only with its sidecar (`<plan>.json`), only if its sha256 matches and only on the TensorRT version
and GPU recorded there. Preprocessing (unless baked into the engine) and batching are the functions the CPU paths use.
tensorrt and pycuda are the optional `[trt]` extra, imported when a runner is created.
"""
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from export.gpu import detect_gpus
from export.sidecar import PlanMismatchError, Sidecar, check_compatible, read_sidecar, verify_plan_file
from export.spec import IOSpec

from ..errors import InferenceError
from ..preprocess import batch_slices
from .base import RunnerSpec, softmax

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
    """One engine, one execution context, page-locked host and device buffers sized for the profile's max batch.

    Implements the runner protocol (`timm_inception_pcam.inference.base.Runner`): `.spec` (a RunnerSpec built from
    the sidecar), `.logits(uint8 NHWC)` and `.close()`. `.io` is the sidecar's input/output description.
    """

    def __init__(self, plan_path: str | Path, sidecar_path: str | Path | None = None):
        self.plan_path = Path(plan_path)
        self.sidecar: Sidecar = read_sidecar(self.plan_path, sidecar_path)
        plan = verify_plan_file(self.plan_path, self.sidecar)
        gpus, problem = detect_gpus()
        if not gpus:
            raise InferenceError(f'{self.plan_path}: cannot run a TensorRT engine here: {problem}')
        trt, cuda = import_runtime()
        check_compatible(self.sidecar, trt.__version__, gpus[0].as_sidecar())
        self._trt, self._cuda = trt, cuda
        self.io: IOSpec = self.sidecar.spec
        self.spec = RunnerSpec(
            backend='tensorrt', precision=self.sidecar.precision, source=str(self.plan_path),
            device=f'cuda:{gpus[0].index}', mean=self.io.mean, std=self.io.std, label_names=self.io.label_names,
            extra={'tensorrt_version': trt.__version__, 'plan_tensorrt_version': self.sidecar.tensorrt_version,
                   'gpu': gpus[0].name, 'profile': self.sidecar.profile.as_dict(), 'baked_in': self.io.baked_in,
                   'activation': self.sidecar.activation, 'version_compatible': self.sidecar.version_compatible,
                   'model': self.sidecar.model,
                   'training_data_provenance': self.sidecar.data.get('training_data_provenance', 'unknown')})
        self.min_batch, self.max_batch = self.sidecar.profile.min, self.sidecar.profile.max
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if self.sidecar.version_compatible:  # the plan carries its own lean runtime, which must be allowed to load
            self._runtime.engine_host_code_allowed = True
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise PlanMismatchError(f'{self.plan_path}: TensorRT could not deserialize the plan (see the log above)')
        self._check_engine()
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise InferenceError(f'{self.plan_path}: could not create an execution context')
        sample = tuple(self.io.input_dict()['shape'][1:])
        n_classes = len(self.io.label_names)
        self._sample_shape = sample
        self._stream = cuda.Stream()
        self._host_in = cuda.pagelocked_empty((self.max_batch, *sample), self.io.input_dtype)
        self._host_out = cuda.pagelocked_empty((self.max_batch, n_classes), np.float32)
        self._dev_in = cuda.mem_alloc(self._host_in.nbytes)
        self._dev_out = cuda.mem_alloc(self._host_out.nbytes)
        for name, buffer in ((self.io.input_name, self._dev_in), (self.io.output_name, self._dev_out)):
            if not self._context.set_tensor_address(name, int(buffer)):
                raise PlanMismatchError(f'{self.plan_path}: TensorRT refused the device address of tensor {name!r} '
                                        f'(set_tensor_address); the plan does not match {self.sidecar.path}')

    def _dtype_name(self, trt_dtype: Any) -> str:
        """numpy name of a TensorRT DataType the sidecar can describe ('float32', 'uint8'), else TensorRT's name."""
        trt = self._trt
        known = {trt.DataType.FLOAT: 'float32', trt.DataType.UINT8: 'uint8'}
        return known.get(trt_dtype, f'TensorRT {getattr(trt_dtype, "name", trt_dtype)}')

    def _check_engine(self) -> None:
        """The engine's IO tensors (mode, dtype, shape) and profile must be the ones the sidecar describes."""
        trt, engine, io = self._trt, self._engine, self.io
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        expected = {io.input_name: (trt.TensorIOMode.INPUT, io.input_dict()),
                    io.output_name: (trt.TensorIOMode.OUTPUT, io.output_dict())}
        problems = []
        if sorted(names) != sorted(expected):
            problems.append(f'IO tensors {names}, sidecar says {sorted(expected)}')
        else:
            for name, (mode, tensor) in expected.items():
                found_mode = engine.get_tensor_mode(name)
                found_dtype = self._dtype_name(engine.get_tensor_dtype(name))
                found_shape = [int(d) for d in engine.get_tensor_shape(name)]
                if found_mode != mode or found_dtype != tensor['dtype'] or found_shape != tensor['shape']:
                    problems.append(f'{name!r} is {found_mode} {found_dtype} {found_shape}, sidecar says {mode} '
                                    f'{tensor["dtype"]} {tensor["shape"]}')
            shapes = engine.get_tensor_profile_shape(io.input_name, 0)
            batches = [int(s[0]) for s in shapes]
            if batches != [self.sidecar.profile.min, self.sidecar.profile.opt, self.sidecar.profile.max]:
                problems.append(f'profile batches {batches}, sidecar says {self.sidecar.profile.as_dict()}')
        if problems:
            raise PlanMismatchError(f'{self.plan_path}: the plan does not match {self.sidecar.path}: '
                                    + '; '.join(problems))

    def logits(self, patches: np.ndarray) -> np.ndarray:
        """Raw uint8 NHWC patches (N, 96, 96, 3) -> float32 logits (N, classes).

        Batches above the profile's max are split; a batch below its min is padded with zero rows, which are dropped.
        With `output.activation` 'none' the engine returns probabilities: their logarithms are returned (softmax of
        them gives the probabilities back).
        """
        x = self.io.prepare(patches, source=f'{self.plan_path.name} input')
        out = np.empty((len(x), self._host_out.shape[1]), np.float32)
        cuda, context, stream = self._cuda, self._context, self._stream
        for s in batch_slices(len(x), self.max_batch):
            b = s.stop - s.start
            rows = max(b, self.min_batch)
            host_in, host_out = self._host_in[:rows], self._host_out[:rows]
            host_in[:b] = x[s]
            host_in[b:] = 0
            cuda.memcpy_htod_async(self._dev_in, host_in, stream)
            if not context.set_input_shape(self.io.input_name, (rows, *self._sample_shape)):
                raise InferenceError(f'{self.plan_path}: batch of {rows} rejected by the engine profile '
                                     f'{self.sidecar.profile.as_dict()}')
            if not context.execute_async_v3(stream.handle):
                raise InferenceError(f'{self.plan_path}: execute_async_v3 failed (see the TensorRT log)')
            cuda.memcpy_dtoh_async(host_out, self._dev_out, stream)
            stream.synchronize()
            out[s] = host_out[:b]
        return self.io.to_logits(out)

    def predict(self, patches: np.ndarray) -> np.ndarray:
        """Class probabilities (N, classes): softmax of the logits."""
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
