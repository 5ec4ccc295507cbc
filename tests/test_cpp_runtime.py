"""C++ runtime (export/cpp): CMake build + ctest, pcam_preprocess parity with the Python preprocessing, bad input,
and the GPU golden check of pcam_trt_infer against onnxruntime FP32 probabilities."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.gpu import detect_gpus
from export.sidecar import DEFAULT_PROFILE, make_sidecar, write_sidecar
from export.spec import IOSpec
from timm_inception_pcam.constants import LABEL_NAMES, PCAM_MEAN, PCAM_STD
from timm_inception_pcam.preprocess import preprocess_patches
from timm_inception_pcam.storage import file_sha256

CPP_DIR = Path(__file__).resolve().parents[1] / 'export' / 'cpp'
PATCH_SHAPE = (96, 96, 3)
# Written by `python -m export.golden --output DIR` (format timm-inception-pcam-golden/1).
GOLDEN_PATCHES = 'patches.bin'
GOLDEN_EXPECTED = 'expected.json'


def _compiler() -> str | None:
    for name in (os.environ.get('CXX'), 'c++', 'g++', 'clang++'):
        if name and shutil.which(name):
            return name
    return None


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope='module')
def cpp_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Configures and builds export/cpp once for this module (TENSORRT_ROOT from the environment, if set)."""
    if shutil.which('cmake') is None:
        pytest.skip('cmake is not installed: the C++ runtime cannot be built here')
    if _compiler() is None:
        pytest.skip('no C++ compiler (c++, g++ or clang++) is installed: the C++ runtime cannot be built here')
    build = tmp_path_factory.mktemp('cpp_build')
    configure = _run(['cmake', '-S', CPP_DIR, '-B', build, '-DCMAKE_BUILD_TYPE=Debug'])  # quickest to compile
    assert configure.returncode == 0, f'cmake configure failed:\n{configure.stdout}\n{configure.stderr}'
    compiled = _run(['cmake', '--build', build, '--parallel', '2'])
    assert compiled.returncode == 0, f'cmake build failed:\n{compiled.stdout}\n{compiled.stderr}'
    return build


def _patches(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *PATCH_SHAPE), dtype=np.uint8)


def _sidecar(
        path: Path,
        *,
        baked_in: bool = False,
        mean: tuple = PCAM_MEAN,
        std: tuple = PCAM_STD,
        profile: tuple[int, int, int] = (1, 4, 8),
        plan_sha256: str = 'b' * 64,
) -> Path:
    """A sidecar as `python -m export.trt` writes it (format timm-inception-pcam-engine/1)."""
    if baked_in:
        tensor_in = {'name': 'input', 'shape': [-1, 96, 96, 3], 'dtype': 'uint8', 'layout': 'NHWC'}
    else:
        tensor_in = {'name': 'input', 'shape': [-1, 3, 96, 96], 'dtype': 'float32', 'layout': 'NCHW'}
    doc = {
        'format': 'timm-inception-pcam-engine/1',
        'model': 'inception_v4_pcam',
        'tensorrt_version': '11.4.0.106',
        'gpu': {'name': 'NVIDIA H100 80GB HBM3', 'compute_capability': '9.0'},
        'precision': 'fp16',
        'input': tensor_in,
        'output': {'name': 'logits', 'shape': [-1, 2], 'dtype': 'float32', 'activation': 'softmax'},
        'profile': dict(zip(('min', 'opt', 'max'), profile)),
        'preprocessing': {'baked_in': baked_in, 'raw_layout': 'NHWC', 'raw_dtype': 'uint8', 'scale': 255.0,
                          'mean': list(mean), 'std': list(std)},
        'label_names': list(LABEL_NAMES),
        'sha256': {'checkpoint': None, 'onnx': 'a' * 64, 'plan': plan_sha256},
    }
    path.write_text(json.dumps(doc, indent=2))
    return path


@pytest.fixture(scope='module')
def patch_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], np.ndarray]:
    """Raw files and PNGs of every colour type, with the uint8 NHWC patches they hold (PNGs as PIL reads them)."""
    root = tmp_path_factory.mktemp('patches')
    files: list[Path] = []
    arrays: list[np.ndarray] = []
    for name, n, seed in (('a.bin', 7, 1), ('b.raw', 3, 2)):
        data = _patches(n, seed)
        (root / name).write_bytes(data.tobytes())
        files.append(root / name)
        arrays.append(data)
    base = _patches(1, 3)[0]
    images = {
        'rgb.png': Image.fromarray(base, 'RGB'),
        'gray.png': Image.fromarray(base[..., 0], 'L'),
        'rgba.png': Image.fromarray(np.dstack([base, base[..., 1]]), 'RGBA'),
        'palette.png': Image.fromarray(base, 'RGB').quantize(colors=64),
    }
    for name, image in images.items():
        image.save(root / name)
        files.append(root / name)
        arrays.append(np.asarray(Image.open(root / name).convert('RGB'))[None])
    return files, np.concatenate(arrays)


def test_ctest_passes(cpp_build: Path) -> None:
    cases = _run([cpp_build / 'pcam_core_tests', '--list'])
    assert cases.returncode == 0, cases.stderr
    n_cases = len(cases.stdout.split())
    result = _run(['ctest', '--output-on-failure', '--test-dir', cpp_build])
    assert result.returncode == 0, f'ctest failed:\n{result.stdout}\n{result.stderr}'
    summary = re.search(r'(\d+)% tests passed, (\d+) tests failed out of (\d+)', result.stdout)
    assert summary, result.stdout
    # Every case is its own ctest entry, plus the check that CMake registers them all.
    assert summary.groups() == ('100', '0', str(n_cases + 1))


@pytest.mark.parametrize('mean,std', [(PCAM_MEAN, PCAM_STD), ((0.5, 0.25, 0.125), (0.2, 0.4, 0.8))],
                         ids=['pcam_stats', 'other_stats'])
def test_preprocess_matches_python(cpp_build: Path, patch_files: tuple, tmp_path: Path, mean: tuple,
                                   std: tuple) -> None:
    files, patches = patch_files
    sidecar = _sidecar(tmp_path / 'model.plan.json', mean=mean, std=std, profile=(3, 4, 4))
    out = tmp_path / 'tensor.bin'
    # 14 patches in batches of 4: the last batch (2) is padded to the profile's min (3); padding is not written.
    result = _run([cpp_build / 'pcam_preprocess', '--sidecar', sidecar, '--output', out, '--quiet', *files])
    assert result.returncode == 0, result.stderr
    assert f'wrote {len(patches)} patches' in result.stderr
    got = np.fromfile(out, dtype=np.float32).reshape(-1, 3, 96, 96)
    expected = preprocess_patches(patches, mean, std)
    assert got.shape == expected.shape
    assert float(expected.std()) > 0.5  # the values compared vary
    max_diff = float(np.abs(got - expected).max())
    assert max_diff <= 1e-6, f'max |C++ - Python| = {max_diff}'


def test_preprocess_baked_in_passes_raw_patches(cpp_build: Path, patch_files: tuple, tmp_path: Path) -> None:
    files, patches = patch_files
    sidecar = _sidecar(tmp_path / 'model.plan.json', baked_in=True)
    out = tmp_path / 'tensor.bin'
    result = _run([cpp_build / 'pcam_preprocess', '--sidecar', sidecar, '--output', out, '--batch-size', '5',
                   '--quiet', *files])
    assert result.returncode == 0, result.stderr
    got = np.fromfile(out, dtype=np.uint8).reshape(-1, *PATCH_SHAPE)
    np.testing.assert_array_equal(got, patches)


@pytest.mark.parametrize('baked_in', [False, True], ids=['float_input', 'baked_in'])
def test_preprocess_reads_export_sidecar(cpp_build: Path, patch_files: tuple, tmp_path: Path, baked_in: bool) -> None:
    """The sidecar as export.sidecar writes it, found as <plan>.json; the tensor is what IOSpec.prepare gives."""
    files, patches = patch_files
    spec = IOSpec(baked_in=baked_in)
    plan = tmp_path / 'model.plan'
    plan.write_bytes(np.random.default_rng(1).bytes(2048))
    write_sidecar(plan, make_sidecar(model='inception_v4_pcam', tensorrt_version='11.4.0.106',
                                     gpu={'name': 'NVIDIA H100 80GB HBM3', 'compute_capability': '9.0'},
                                     precision='fp16', spec=spec, profile=DEFAULT_PROFILE, checkpoint_sha256=None,
                                     onnx_sha256='0' * 64, plan_sha256=file_sha256(plan)))
    out = tmp_path / 'tensor.bin'
    result = _run([cpp_build / 'pcam_preprocess', '--engine', plan, '--output', out, '--quiet', *files])
    assert result.returncode == 0, result.stderr
    expected = spec.prepare(patches)
    got = np.fromfile(out, dtype=expected.dtype).reshape(expected.shape)
    if baked_in:
        np.testing.assert_array_equal(got, expected)
    else:
        assert float(np.abs(got - expected).max()) <= 1e-6


def test_preprocess_checks_plan_sha256(cpp_build: Path, patch_files: tuple, tmp_path: Path) -> None:
    files, patches = patch_files
    plan = tmp_path / 'model.plan'
    plan.write_bytes(np.random.default_rng(0).bytes(4096))
    _sidecar(tmp_path / 'model.plan.json', plan_sha256=file_sha256(plan))  # found as <plan>.json
    out = tmp_path / 'tensor.bin'
    ok = _run([cpp_build / 'pcam_preprocess', '--engine', plan, '--output', out, '--quiet', files[0]])
    assert ok.returncode == 0, ok.stderr
    assert out.stat().st_size == 7 * 3 * 96 * 96 * 4

    out.unlink()
    plan.write_bytes(plan.read_bytes()[:1000])  # truncated
    bad = _run([cpp_build / 'pcam_preprocess', '--engine', plan, '--output', out, files[0]])
    assert bad.returncode != 0
    assert str(plan) in bad.stderr and file_sha256(plan) in bad.stderr and 'truncated' in bad.stderr
    assert not out.exists()


def _bad_cases(tmp: Path, good_bin: Path) -> dict[str, tuple[list, list[str]]]:
    """name -> (pcam_preprocess arguments after --output, fragments the error message must contain)."""
    short = tmp / 'short.bin'
    short.write_bytes(b'\0' * 1000)
    big = tmp / 'big.png'
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(big)
    jpg = tmp / 'patch.jpg'
    jpg.write_bytes(b'\xff\xd8')
    sidecar = _sidecar(tmp / 'ok.json')
    doc = json.loads(sidecar.read_text())
    del doc['profile']
    (tmp / 'no_profile.json').write_text(json.dumps(doc))
    doc = json.loads(sidecar.read_text())
    doc['preprocessing']['baked_in'] = True  # input still float32 NCHW: inconsistent
    (tmp / 'inconsistent.json').write_text(json.dumps(doc))
    return {
        'truncated_bin': (['--sidecar', sidecar, short], [str(short), '1000 bytes', 'multiple of 27648']),
        'png_size': (['--sidecar', sidecar, big], [str(big), '128x64', '96x96']),
        'extension': (['--sidecar', sidecar, jpg], [str(jpg), "'.jpg'"]),
        'missing_patch': (['--sidecar', sidecar, tmp / 'none.bin'], ['none.bin', 'does not exist']),
        'missing_sidecar': (['--engine', tmp / 'none.plan', good_bin], ['none.plan.json', 'does not exist']),
        'missing_field': (['--sidecar', tmp / 'no_profile.json', good_bin], ["missing field 'profile'"]),
        'inconsistent': (['--sidecar', tmp / 'inconsistent.json', good_bin],
                         ["'input.shape'", '[-1, 96, 96, 3]', 'baked_in=true']),
        'batch_size': (['--sidecar', sidecar, '--batch-size', '64', good_bin], ['batch size 64', '[1, 8]']),
    }


@pytest.mark.parametrize('case', ['truncated_bin', 'png_size', 'extension', 'missing_patch', 'missing_sidecar',
                                  'missing_field', 'inconsistent', 'batch_size'])
def test_preprocess_bad_input(cpp_build: Path, patch_files: tuple, tmp_path: Path, case: str) -> None:
    args, fragments = _bad_cases(tmp_path, patch_files[0][0])[case]
    out = tmp_path / 'out' / 'tensor.bin'
    out.parent.mkdir()
    result = _run([cpp_build / 'pcam_preprocess', '--output', out, *args])
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith('pcam_preprocess: error: ')
    for fragment in fragments:
        assert fragment in message
    assert list(out.parent.iterdir()) == []  # nothing half-written


@pytest.mark.gpu
def test_trt_infer_matches_onnxruntime_golden(cpp_build: Path, tmp_path: Path) -> None:
    """pcam_trt_infer on the golden patches vs the onnxruntime FP32 probabilities of `python -m export.golden`.

    PCAM_TRT_PLAN: a plan built by `python -m export.trt` from the golden set's model.onnx (or model.fp16.onnx);
    PCAM_GOLDEN_DIR: the golden set (default: the plan's folder).
    """
    gpus, problem = detect_gpus()
    if not gpus:
        pytest.skip(f'needs an NVIDIA GPU with TensorRT: {problem}')
    if not os.environ.get('PCAM_TRT_PLAN'):
        pytest.skip('set PCAM_TRT_PLAN to a plan built by `python -m export.trt` from `python -m export.golden` output')
    binary = cpp_build / 'pcam_trt_infer'
    if not binary.exists():
        pytest.skip('pcam_trt_infer was not built: TensorRT not found (set TENSORRT_ROOT to its install prefix)')
    plan = Path(os.environ['PCAM_TRT_PLAN'])
    golden_dir = Path(os.environ.get('PCAM_GOLDEN_DIR', plan.parent))
    patches_file, expected_file = golden_dir / GOLDEN_PATCHES, golden_dir / GOLDEN_EXPECTED
    for path in (plan, patches_file, expected_file):
        if not path.exists():
            pytest.skip(f'{path} is missing: write it with `python -m export.golden` and `python -m export.trt`')
    expected = json.loads(expected_file.read_text())
    sidecar = json.loads(Path(f'{plan}.json').read_text())
    assert sidecar['sha256']['onnx'] in (expected['onnx']['fp32_sha256'], expected['onnx']['fp16_sha256']), \
        f'{plan} was not built from the golden ONNX models in {golden_dir}: the comparison would mean nothing'
    golden = np.asarray(expected['probabilities_fp32'], dtype=np.float32)

    out_json, out_csv = tmp_path / 'pred.json', tmp_path / 'pred.csv'
    for fmt, out in (('json', out_json), ('csv', out_csv)):
        result = _run([binary, '--engine', plan, '--format', fmt, '--output', out, '--quiet', patches_file])
        assert result.returncode == 0, result.stderr
    doc = json.loads(out_json.read_text())
    probs = np.array([p['probabilities'] for p in doc['predictions']], dtype=np.float32)
    assert [p['index'] for p in doc['predictions']] == list(range(len(golden)))
    csv_probs = np.loadtxt(out_csv, delimiter=',', skiprows=1, usecols=(2, 3), dtype=np.float32)
    np.testing.assert_array_equal(csv_probs.reshape(probs.shape), probs)

    assert probs.shape == golden.shape
    assert float(golden[:, 1].std()) > 0.01, 'golden probabilities do not vary: the comparison would mean nothing'
    max_diff = float(np.abs(probs - golden).max())
    agreement = float((probs.argmax(1) == golden.argmax(1)).mean())
    precision = sidecar['precision']
    print(f'pcam_trt_infer ({precision}) vs onnxruntime FP32: max |dp| = {max_diff:.2e}, '
          f'decision agreement {agreement:.4f}, {doc["throughput"]["inference_patches_per_second"]:.0f} patches/s')
    tolerance = expected['tolerance']
    assert max_diff <= tolerance[f'{precision}_engine_max_abs_prob_diff']
    assert agreement >= tolerance['fp16_engine_min_decision_agreement']  # FP32 engines are held to the same floor
