"""Crash-proof answers to "is there a GPU, TensorRT, pycuda here?", asked before any TensorRT object exists.

    python -m export.gpu      # prints what is present, exits 0 only when an engine can be built and run

The GPU is found through the CUDA runtime of cuda-python (`cudaGetDeviceCount`), which returns an error code instead
of crashing when there is no driver. TensorRT and pycuda are only imported here, never used: creating a TensorRT
builder or runtime without a GPU can segfault.
"""
import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from importlib import metadata

from timm_inception_pcam.errors import ArgumentParser

TENSORRT_MAJOR = 11  # oldest TensorRT major version the project supports; export/cpp/CMakeLists.txt has the same
CUDA_PYTHON_MIN = '12.6.1'  # first cuda-python with the `cuda.bindings` module layout (pyproject says the same)

__all__ = ['TENSORRT_MAJOR', 'CUDA_PYTHON_MIN', 'GpuInfo', 'Environment', 'detect_gpus', 'tensorrt_version',
           'pycuda_status', 'probe', 'main']


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str
    total_memory: int

    def as_sidecar(self) -> dict[str, str]:
        return {'name': self.name, 'compute_capability': self.compute_capability}


@dataclass(frozen=True)
class Environment:
    gpus: list[GpuInfo] = field(default_factory=list)
    gpu_problem: str | None = None
    tensorrt_version: str | None = None
    tensorrt_problem: str | None = None
    pycuda_problem: str | None = None

    @property
    def can_build(self) -> bool:
        return bool(self.gpus) and self.tensorrt_version is not None

    @property
    def can_run(self) -> bool:
        return self.can_build and self.pycuda_problem is None

    def missing(self, need_pycuda: bool = False) -> list[str]:
        """Human-readable list of what prevents building (and running, with need_pycuda)."""
        problems = [p for p in (self.gpu_problem, self.tensorrt_problem) if p]
        if need_pycuda and self.pycuda_problem:
            problems.append(self.pycuda_problem)
        return problems


def detect_gpus() -> tuple[list[GpuInfo], str | None]:
    """Visible CUDA devices, or an empty list and the reason."""
    try:
        from cuda.bindings import runtime
    except ImportError as e:
        return [], (f'cuda-python {_cuda_python_version()} has no cuda.bindings ({e}); cannot look for a GPU: '
                    f'install cuda-python>={CUDA_PYTHON_MIN}')
    try:
        err, count = runtime.cudaGetDeviceCount()
        if err != runtime.cudaError_t.cudaSuccess:
            return [], f'no usable CUDA GPU (cudaGetDeviceCount: {_error_name(runtime, err)})'
        if not count:
            return [], 'no CUDA GPU (cudaGetDeviceCount returned 0 devices)'
        gpus = []
        for i in range(count):
            err, props = runtime.cudaGetDeviceProperties(i)
            if err != runtime.cudaError_t.cudaSuccess:
                return [], f'cannot read the properties of CUDA device {i} ({_error_name(runtime, err)})'
            name = props.name.split(b'\0', 1)[0].decode(errors='replace') if isinstance(props.name, bytes) \
                else str(props.name)
            gpus.append(GpuInfo(i, name, f'{props.major}.{props.minor}', int(props.totalGlobalMem)))
        return gpus, None
    except Exception as e:  # a broken CUDA install must not stop the CPU stages
        return [], f'CUDA runtime query failed ({type(e).__name__}: {e})'


def _cuda_python_version() -> str:
    try:
        return metadata.version('cuda-python')
    except metadata.PackageNotFoundError:
        return '(not installed)'


def _error_name(runtime, err) -> str:
    try:
        ok, name = runtime.cudaGetErrorName(err)
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return str(err)


def tensorrt_version() -> tuple[str | None, str | None]:
    """TensorRT's version if the Python package imports (no TensorRT object is created), else None and why."""
    if importlib.util.find_spec('tensorrt') is None:
        return None, "TensorRT is not installed (no 'tensorrt' module; pip install -e '.[trt]')"
    try:
        trt = importlib.import_module('tensorrt')
    except Exception as e:
        return None, f"TensorRT does not import ({type(e).__name__}: {e}); install the full 'tensorrt' wheel"
    version = str(getattr(trt, '__version__', ''))
    if not version.split('.')[0].isdigit() or int(version.split('.')[0]) < TENSORRT_MAJOR:
        return None, (f'TensorRT {version or "of unknown version"} found, this project needs TensorRT '
                      f'{TENSORRT_MAJOR} or newer')
    return version, None


def pycuda_status() -> str | None:
    """None when pycuda is installed, else why not (it is not imported: that needs a driver)."""
    if importlib.util.find_spec('pycuda') is None:
        return "pycuda is not installed (pip install -e '.[trt]', needs the CUDA toolkit to build)"
    return None


def probe() -> Environment:
    gpus, gpu_problem = detect_gpus()
    version, trt_problem = tensorrt_version()
    return Environment(gpus, gpu_problem, version, trt_problem, pycuda_status())


def main(argv: list[str] | None = None) -> int:
    ArgumentParser(prog='python -m export.gpu', description=__doc__.split('\n\n')[0]).parse_args(argv)
    env = probe()
    for gpu in env.gpus:
        print(f'GPU {gpu.index}: {gpu.name}, compute capability {gpu.compute_capability}, '
              f'{gpu.total_memory / 2**30:.1f} GiB')
    print(f'TensorRT: {env.tensorrt_version or "missing"}')
    for problem in env.missing(need_pycuda=True):
        print(f'missing: {problem}')
    print('ready to build and run engines' if env.can_run else 'not ready for TensorRT engines')
    return 0 if env.can_run else 1


if __name__ == '__main__':
    sys.exit(main())
