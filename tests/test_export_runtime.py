"""Sidecar contract, shared preprocessing/batching of the runners, GPU detection, and the TensorRT runner's control
flow against a numpy stand-in for tensorrt/pycuda (no GPU needed)."""
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import export.trt as export_trt
import timm_inception_pcam.inference.trt_runner as runtime
from export.gpu import CUDA_PYTHON_MIN, GpuInfo, detect_gpus, probe
from export.sidecar import (
    DEFAULT_PROFILE,
    PlanMismatchError,
    Profile,
    check_compatible,
    make_sidecar,
    read_sidecar,
    verify_plan_file,
    write_sidecar,
)
from export.spec import IOSpec
from timm_inception_pcam.inference.base import Runner
from timm_inception_pcam.preprocess import preprocess_patches
from timm_inception_pcam.storage import file_sha256

GOLDEN = Path(__file__).parent / 'golden' / 'export'
GPU = {'name': 'NVIDIA H100 80GB HBM3', 'compute_capability': '9.0'}


def _patches(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)


def _plan(tmp_path: Path, spec: IOSpec | None = None, profile: Profile | None = None) -> Path:
    spec, profile = spec or IOSpec(), profile or Profile(1, 4, 8)
    plan = tmp_path / 'model.fp16.plan'
    plan.write_bytes(b'not a real engine, only hashed' * 10)
    write_sidecar(plan, make_sidecar(model='inception_v4_pcam', tensorrt_version='11.4.0.106', gpu=GPU,
                                     precision='fp16', spec=spec, profile=profile, checkpoint_sha256=None,
                                     onnx_sha256='0' * 64, plan_sha256=file_sha256(plan)))
    return plan


def test_spec_prepare_is_the_shared_preprocessing() -> None:
    x = _patches(3)
    np.testing.assert_array_equal(IOSpec().prepare(x), preprocess_patches(x))
    baked = IOSpec(baked_in=True).prepare(x)
    assert baked.dtype == np.uint8 and baked.shape == (3, 96, 96, 3)
    with pytest.raises(ValueError, match='uint8'):
        IOSpec().prepare(x.astype(np.float32))
    with pytest.raises(ValueError, match=r'\(N, 96, 96, 3\)'):
        IOSpec().prepare(x[:, :64])
    with pytest.raises(ValueError, match='float32'):
        IOSpec().check_prepared(preprocess_patches(x).astype(np.float64))


def test_sidecar_round_trip_and_consistency_errors(tmp_path: Path) -> None:
    plan = _plan(tmp_path, IOSpec(baked_in=True))
    sidecar = read_sidecar(plan)
    assert sidecar.spec == IOSpec(baked_in=True) and sidecar.profile == Profile(1, 4, 8)
    assert sidecar.data['input'] == {'name': 'input', 'shape': [-1, 96, 96, 3], 'dtype': 'uint8', 'layout': 'NHWC'}
    assert verify_plan_file(plan, sidecar) == plan.read_bytes()
    data = json.loads(sidecar.path.read_text())
    for mutate, message in ((lambda d: d.update(format='other/1'), 'format'),
                            (lambda d: d['input'].update(dtype='float32'), 'input.dtype'),
                            (lambda d: d['profile'].update(opt=99), 'profile'),
                            (lambda d: d['preprocessing'].update(std=[0.2, 0.2]), 'std'),
                            (lambda d: d.pop('tensorrt_version'), 'tensorrt_version')):
        broken = json.loads(json.dumps(data))
        mutate(broken)
        sidecar.path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            read_sidecar(plan)
    sidecar.path.unlink()
    with pytest.raises(FileNotFoundError, match='sidecar'):
        read_sidecar(plan)


def test_truncated_plan_and_foreign_machine_are_refused(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    sidecar = read_sidecar(plan)
    plan.write_bytes(plan.read_bytes()[:50])
    with pytest.raises(PlanMismatchError, match='truncated'):
        verify_plan_file(plan, sidecar)
    check_compatible(sidecar, '11.4.0.106', GPU)
    with pytest.raises(PlanMismatchError, match='TensorRT 11.4.0.106.*TensorRT 11.5.0.1'):
        check_compatible(sidecar, '11.5.0.1', GPU)
    with pytest.raises(PlanMismatchError, match='compute capability 8.9'):
        check_compatible(sidecar, '11.4.0.106', {'name': 'NVIDIA L4', 'compute_capability': '8.9'})


def test_committed_golden_files_match_the_python_preprocessing() -> None:
    manifest = json.loads((GOLDEN / 'manifest.json').read_text())
    for name, digest in manifest['sha256'].items():
        assert file_sha256(GOLDEN / name) == digest, name
    n = manifest['patches']['shape'][0]
    patches = np.fromfile(GOLDEN / manifest['patches']['file'], np.uint8).reshape(n, 96, 96, 3)
    expected = np.fromfile(GOLDEN / manifest['preprocessed']['file'], '<f4').reshape(n, 3, 96, 96)
    np.testing.assert_array_equal(preprocess_patches(patches), expected)
    assert patches.std() > 10  # real-looking patches, not a constant image
    for name in manifest['sidecars']:
        sidecar = read_sidecar(GOLDEN / 'unused.plan', GOLDEN / name)
        assert sidecar.profile == DEFAULT_PROFILE


def test_gpu_probe_never_crashes() -> None:
    gpus, problem = detect_gpus()
    assert bool(gpus) != bool(problem)
    env = probe()
    if not env.can_build:
        assert env.missing() and all(isinstance(p, str) and p for p in env.missing())
    if not gpus:
        assert 'GPU' in problem or 'cuda' in problem.lower()


def test_runner_without_gpu_or_extra_says_what_is_missing(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    if detect_gpus()[0]:
        pytest.skip('a GPU is present: the missing-GPU message is not produced here')
    with pytest.raises(RuntimeError, match='cannot run a TensorRT engine here'):
        runtime.TrtRunner(plan)


class _DeviceBuffer:
    def __init__(self, cuda: '_FakeCuda', address: int) -> None:
        self.cuda, self.value = cuda, address

    def __int__(self) -> int:
        return self.value

    def free(self) -> None:
        self.cuda.memory.pop(self.value, None)


class _FakeCuda:
    """numpy stand-in for pycuda.driver: 'device' memory is a dict of arrays keyed by address."""

    def __init__(self) -> None:
        self.memory: dict[int, np.ndarray] = {}

    def pagelocked_empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def mem_alloc(self, nbytes: int) -> '_DeviceBuffer':
        address = 4096 * (len(self.memory) + 1)
        self.memory[address] = np.zeros(nbytes, np.uint8)
        return _DeviceBuffer(self, address)

    def memcpy_htod_async(self, dev, host, stream) -> None:
        raw = np.ascontiguousarray(host).view(np.uint8).reshape(-1)
        self.memory[dev.value][:raw.size] = raw

    def memcpy_dtoh_async(self, host, dev, stream) -> None:
        host.reshape(-1).view(np.uint8)[:] = self.memory[dev.value][:host.nbytes]

    def Stream(self):  # noqa: N802  (pycuda's name)
        return SimpleNamespace(handle=0, synchronize=lambda: None)


def _fake_trt(cuda: _FakeCuda, spec: IOSpec, profile: Profile, calls: list[int], **engine_overrides):
    """tensorrt stand-in whose engine computes logits = per-patch channel means of the prepared input.

    Like TensorRT, the context refuses a batch outside the profile and a tensor address for an unknown name;
    `engine_overrides` replaces engine attributes (to describe a plan that does not match its sidecar).
    """
    data_type = SimpleNamespace(FLOAT='FLOAT', UINT8='UINT8', HALF='HALF', BF16='BF16')
    io_names = [spec.input_name, spec.output_name]

    class Context:
        def __init__(self) -> None:
            self.addresses: dict[str, int] = {}
            self.batch = 0

        def set_tensor_address(self, name: str, address: int) -> bool:
            if name not in io_names:
                return False
            self.addresses[name] = address
            return True

        def set_input_shape(self, name: str, shape) -> bool:
            self.batch = shape[0]
            return profile.min <= shape[0] <= profile.max

        def execute_async_v3(self, stream) -> bool:
            calls.append(self.batch)
            sample = spec.input_dict()['shape'][1:]
            x = cuda.memory[self.addresses[spec.input_name]].view(spec.input_dtype)
            x = x[:self.batch * int(np.prod(sample))].reshape(self.batch, *sample).astype(np.float32)
            axes = (1, 2) if spec.baked_in else (2, 3)
            logits = x.mean(axis=axes)[:, :2].astype(np.float32)
            cuda.memory[self.addresses[spec.output_name]][:logits.nbytes] = logits.reshape(-1).view(np.uint8)
            return True

    input_type = data_type.UINT8 if spec.baked_in else data_type.FLOAT
    engine = SimpleNamespace(
        num_io_tensors=2, get_tensor_name=lambda i: io_names[i],
        get_tensor_mode=lambda n: 'IN' if n == spec.input_name else 'OUT',
        get_tensor_dtype=lambda n: input_type if n == spec.input_name else data_type.FLOAT,
        get_tensor_shape=lambda n: (spec.input_dict() if n == spec.input_name else spec.output_dict())['shape'],
        get_tensor_profile_shape=lambda n, p: [(b, 3, 96, 96) for b in (profile.min, profile.opt, profile.max)],
        create_execution_context=Context)
    for key, value in engine_overrides.items():
        setattr(engine, key, value)
    runtime_object = SimpleNamespace(deserialize_cuda_engine=lambda plan: engine, engine_host_code_allowed=False)
    trt = SimpleNamespace(
        __version__='11.4.0.106', DataType=data_type, TensorIOMode=SimpleNamespace(INPUT='IN', OUTPUT='OUT'),
        Runtime=lambda logger: runtime_object, runtime_object=runtime_object)
    trt.Logger = lambda level: None
    trt.Logger.WARNING = 2
    return trt


def _use_fakes(monkeypatch: pytest.MonkeyPatch, trt, cuda: _FakeCuda, gpu_name: str = GPU['name']) -> None:
    monkeypatch.setattr(runtime, 'detect_gpus', lambda: ([GpuInfo(0, gpu_name, '9.0', 80 << 30)], None))
    monkeypatch.setattr(runtime, 'import_runtime', lambda: (trt, cuda))
    monkeypatch.setitem(sys.modules, 'tensorrt', trt)


def _expected_logits(spec: IOSpec, patches: np.ndarray) -> np.ndarray:
    x = spec.prepare(patches).astype(np.float32)
    return x.mean(axis=(1, 2))[:, :2] if spec.baked_in else x.mean(axis=(2, 3))[:, :2]


@pytest.mark.parametrize('baked_in', [False, True])
def test_runner_prepares_and_splits_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, baked_in: bool) -> None:
    spec, profile, calls, cuda = IOSpec(baked_in=baked_in), Profile(1, 4, 8), [], _FakeCuda()
    trt = _fake_trt(cuda, spec, profile, calls)
    plan = _plan(tmp_path, spec, profile)
    _use_fakes(monkeypatch, trt, cuda)
    patches = _patches(19)
    with runtime.TrtRunner(plan) as runner:
        logits = runner.logits(patches)
        probs = runner.predict(patches[:3])
    assert calls[:3] == [8, 8, 3]  # 19 patches with a profile max of 8
    np.testing.assert_allclose(logits, _expected_logits(spec, patches), rtol=1e-6)
    assert logits.std(axis=0).min() > 1e-3  # the stand-in's outputs do vary with the input
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    assert not cuda.memory  # device buffers freed on close
    with pytest.raises(PlanMismatchError, match='TensorRT 11.4.0.106'):
        monkeypatch.setattr(trt, '__version__', '11.9.9.9')
        runtime.TrtRunner(plan)


def test_runner_pads_a_batch_below_the_profile_min(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, profile, calls, cuda = IOSpec(), Profile(4, 4, 8), [], _FakeCuda()
    trt = _fake_trt(cuda, spec, profile, calls)
    _use_fakes(monkeypatch, trt, cuda)
    patches = _patches(19)
    with runtime.TrtRunner(_plan(tmp_path, spec, profile)) as runner:
        assert isinstance(runner, Runner)
        assert runner.spec.backend == 'tensorrt' and runner.spec.precision == 'fp16'
        assert runner.spec.extra['profile'] == profile.as_dict()
        logits = runner.logits(patches)
        single = runner.logits(patches[:1])
    assert calls == [8, 8, 4, 4]  # 3 leftover rows and a single patch, each padded to the profile min of 4
    assert logits.shape == (19, 2) and single.shape == (1, 2)
    np.testing.assert_allclose(logits, _expected_logits(spec, patches), rtol=1e-6)
    np.testing.assert_allclose(single, logits[:1], rtol=1e-6)


def test_runner_honours_activation_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """activation 'none': the engine returns probabilities; predict() gives them back unchanged."""
    spec, profile, cuda = IOSpec(baked_in=True), Profile(1, 4, 8), _FakeCuda()
    trt = _fake_trt(cuda, spec, profile, [])
    _use_fakes(monkeypatch, trt, cuda)
    plan = _plan(tmp_path, spec, profile)
    data = json.loads(Path(f'{plan}.json').read_text())
    data['output']['activation'] = 'none'
    Path(f'{plan}.json').write_text(json.dumps(data))
    patches = _patches(5)
    raw = _expected_logits(spec, patches)  # the fake engine's (positive) outputs, taken as probabilities
    assert raw.min() > 0
    with runtime.TrtRunner(plan) as runner:
        np.testing.assert_allclose(runner.predict(patches), raw / raw.sum(1, keepdims=True), rtol=1e-5)


@pytest.mark.parametrize('override, message', [
    ({'get_tensor_dtype': lambda n: 'BF16' if n == 'logits' else 'FLOAT'}, r"'logits' is OUT TensorRT BF16"),
    ({'get_tensor_dtype': lambda n: 'HALF' if n == 'input' else 'FLOAT'}, r"'input' is IN TensorRT HALF"),
    ({'get_tensor_shape': lambda n: (-1, 3) if n == 'logits' else (-1, 3, 96, 96)}, r'\[-1, 3\], sidecar says'),
    ({'get_tensor_profile_shape': lambda n, p: [(b, 3, 96, 96) for b in (1, 4, 16)]}, 'profile batches'),
])
def test_runner_refuses_an_engine_unlike_its_sidecar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     override: dict, message: str) -> None:
    spec, profile, cuda = IOSpec(), Profile(1, 4, 8), _FakeCuda()
    trt = _fake_trt(cuda, spec, profile, [], **override)
    _use_fakes(monkeypatch, trt, cuda)
    with pytest.raises(PlanMismatchError, match=message):
        runtime.TrtRunner(_plan(tmp_path, spec, profile))


def test_runner_checks_set_tensor_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, profile, cuda = IOSpec(), Profile(1, 4, 8), _FakeCuda()

    class RefusingContext:
        def set_tensor_address(self, name: str, address: int) -> bool:
            return name != 'logits'

    trt = _fake_trt(cuda, spec, profile, [], create_execution_context=RefusingContext)
    _use_fakes(monkeypatch, trt, cuda)
    with pytest.raises(PlanMismatchError, match="address of tensor 'logits'"):
        runtime.TrtRunner(_plan(tmp_path, spec, profile))


def test_runner_gpu_and_version_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    """Same compute capability, other name: a warning; a version-compatible plan loads in a later 11.x."""
    spec, profile, cuda = IOSpec(), Profile(1, 4, 8), _FakeCuda()
    trt = _fake_trt(cuda, spec, profile, [])
    _use_fakes(monkeypatch, trt, cuda, gpu_name='NVIDIA H200')
    plan = _plan(tmp_path, spec, profile)
    with caplog.at_level('WARNING'), runtime.TrtRunner(plan):
        pass
    assert 'built on NVIDIA H100 80GB HBM3, running on NVIDIA H200' in caplog.text
    assert trt.runtime_object.engine_host_code_allowed is False
    monkeypatch.setattr(trt, '__version__', '11.5.0.3')
    with pytest.raises(PlanMismatchError, match='only loads in the TensorRT release that built it'):
        runtime.TrtRunner(plan)
    data = json.loads(Path(f'{plan}.json').read_text())
    data['version_compatible'] = True
    Path(f'{plan}.json').write_text(json.dumps(data))
    with runtime.TrtRunner(plan) as runner:
        assert runner.spec.extra['version_compatible'] is True
    assert trt.runtime_object.engine_host_code_allowed is True
    monkeypatch.setattr(trt, '__version__', '11.3.9.1')
    with pytest.raises(PlanMismatchError, match='version-compatible plan built with TensorRT 11.4.0.106'):
        runtime.TrtRunner(plan)


class _FakeBuilderConfig:
    """TensorRT builder config stand-in: flags start as TensorRT's defaults (TF32 on); timing caches are bytes."""

    def __init__(self, accept_cache) -> None:
        self.flags = {'TF32'}
        self.accept_cache = accept_cache
        self.cache: bytes | None = None
        self.limits: dict = {}
        self.builder_optimization_level = 3

    def set_memory_pool_limit(self, pool, size: int) -> None:
        self.limits[pool] = size

    def set_flag(self, flag) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag) -> None:
        self.flags.discard(flag)

    def create_timing_cache(self, data: bytes):
        return self.accept_cache(data)

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self):
        return SimpleNamespace(serialize=lambda: b'timings:' + self.cache)

    def add_optimization_profile(self, profile) -> None:
        self.profile = profile


def _fake_builder_trt(config: _FakeBuilderConfig):
    network = SimpleNamespace(num_inputs=1, get_input=lambda i: SimpleNamespace(name='input', shape=(-1, 3, 96, 96)))
    profile = SimpleNamespace(shapes={})
    profile.set_shape = lambda name, lo, opt, hi: profile.shapes.update({name: (lo, opt, hi)})
    builder = SimpleNamespace(create_network=lambda: network, create_builder_config=lambda: config,
                              create_optimization_profile=lambda: profile,
                              build_serialized_network=lambda net, cfg: b'serialized plan')
    trt = SimpleNamespace(
        Logger=SimpleNamespace(VERBOSE=0, WARNING=2), Builder=lambda logger: builder,
        OnnxParser=lambda net, logger: SimpleNamespace(parse_from_file=lambda path: True),
        MemoryPoolType=SimpleNamespace(WORKSPACE='WORKSPACE'),
        BuilderFlag=SimpleNamespace(TF32='TF32', VERSION_COMPATIBLE='VERSION_COMPATIBLE'))
    trt.Logger = type('Logger', (), {'VERBOSE': 0, 'WARNING': 2, '__init__': lambda self, level: None})
    return trt, profile


def _build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: _FakeBuilderConfig, **kwargs) -> bytes:
    trt, _ = _fake_builder_trt(config)
    monkeypatch.setattr(export_trt, 'import_tensorrt', lambda: trt)
    return export_trt.build_engine(tmp_path / 'm.onnx', IOSpec(), profile=Profile(1, 4, 8), workspace_bytes=1 << 30,
                                   opt_level=2, timing_cache=tmp_path / 'timing.cache', **kwargs)


def test_builder_clears_tf32_and_sets_version_compatible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _FakeBuilderConfig(lambda data: data)
    assert _build(tmp_path, monkeypatch, config) == b'serialized plan'
    assert config.flags == set()  # TF32 (TensorRT's default) cleared: FP32 layers compute in FP32
    assert config.limits == {'WORKSPACE': 1 << 30} and config.builder_optimization_level == 2
    assert (tmp_path / 'timing.cache').read_bytes() == b'timings:'
    config = _FakeBuilderConfig(lambda data: data)
    _build(tmp_path, monkeypatch, config, version_compatible=True)
    assert config.flags == {'VERSION_COMPATIBLE'}
    assert config.cache == b'timings:'  # the saved cache was reused


@pytest.mark.parametrize('refusal', ['none', 'raise'])
def test_builder_survives_a_foreign_timing_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture, refusal: str) -> None:
    def accept_only_new(data: bytes):
        if data:
            if refusal == 'raise':
                raise RuntimeError('timing cache version mismatch')
            return None
        return b'new'

    (tmp_path / 'timing.cache').write_bytes(b'from TensorRT 10')
    with caplog.at_level('WARNING'):
        assert _build(tmp_path, monkeypatch, _FakeBuilderConfig(accept_only_new)) == b'serialized plan'
    assert f'could not load {tmp_path / "timing.cache"}' in caplog.text or 'could not use' in caplog.text
    assert (tmp_path / 'timing.cache').read_bytes() == b'timings:new'
    caplog.clear()
    (tmp_path / 'timing.cache').write_bytes(b'from TensorRT 10')
    with caplog.at_level('WARNING'):  # not even a new cache: the build goes on without one and saves none
        assert _build(tmp_path, monkeypatch, _FakeBuilderConfig(lambda data: None)) == b'serialized plan'
    assert 'building without a timing cache' in caplog.text
    assert (tmp_path / 'timing.cache').read_bytes() == b'from TensorRT 10'


def test_trt_command_flags_and_user_errors(tmp_path: Path) -> None:
    args = export_trt.build_parser().parse_args(['--output', 'out', '--version-compatible'])
    assert not args.fp16  # FP32 unless --fp16, as the docstring says
    assert 'FP32, or mixed FP16 with --fp16' in export_trt.__doc__
    assert export_trt.finish_command(Path('m.fp16.onnx'), args).endswith('--version-compatible')
    proc = subprocess.run([sys.executable, '-m', 'export.trt', '--from-onnx', str(tmp_path / 'missing.onnx'),
                           '--output', str(tmp_path)], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'missing.onnx not found' in lines[0] and 'Traceback' not in proc.stderr


def test_gpu_probe_names_the_cuda_python_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, 'cuda.bindings', None)  # as with cuda-python < 12.6.1: no cuda.bindings
    gpus, problem = detect_gpus()
    assert gpus == [] and f'install cuda-python>={CUDA_PYTHON_MIN}' in problem
    assert f'cuda-python {metadata.version("cuda-python")} has no cuda.bindings' in problem
    pyproject = (Path(__file__).parents[1] / 'pyproject.toml').read_text()
    assert f'"cuda-python>={CUDA_PYTHON_MIN}"' in pyproject
