"""End to end on a GPU: golden set -> FP32 and FP16 engines -> Python runner and C++ runner vs onnxruntime FP32.

Run on a machine with an NVIDIA GPU, TensorRT 11 and pycuda (pip install -e '.[trt]'):

    pytest -m gpu tests/test_export_gpu.py

The C++ runner is used when built (export/cpp/build/pcam_trt_infer, or the path in PCAM_TRT_INFER). Skipped with the
reason when a GPU, TensorRT or pycuda is missing.
"""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from export.gpu import probe

pytestmark = pytest.mark.gpu
ENV = probe()
if not ENV.can_run:
    pytest.skip('needs an NVIDIA GPU, TensorRT 11 and pycuda: ' + '; '.join(ENV.missing(need_pycuda=True)),
                allow_module_level=True)

from export import trt as export_trt  # noqa: E402
from export.sidecar import PlanMismatchError, read_sidecar  # noqa: E402
from timm_inception_pcam.inference.trt_runner import TrtRunner  # noqa: E402

CPP_RUNNER = Path(os.environ.get('PCAM_TRT_INFER', Path(__file__).parents[1] / 'export/cpp/build/pcam_trt_infer'))


@pytest.fixture(scope='module')
def golden(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from export.golden import write_golden
    out = tmp_path_factory.mktemp('golden')
    files = write_golden(out)
    expected = json.loads(files['expected'].read_text())
    patches = np.fromfile(files['patches'], np.uint8).reshape(expected['patches']['shape'])
    plans = {}
    for precision, onnx_path in (('fp32', files['onnx']), ('fp16', files['fp16_onnx'])):
        assert export_trt.main(['--from-onnx', str(onnx_path), '--output', str(out), '--opt-level', '2']) == 0
        plans[precision] = out / (onnx_path.name.removesuffix('.onnx') + '.plan')
    return {'out': out, 'files': files, 'expected': expected, 'patches': patches, 'plans': plans}


@pytest.mark.parametrize('precision', ['fp32', 'fp16'])
def test_python_runner_matches_onnxruntime(golden: dict, precision: str) -> None:
    expected = np.asarray(golden['expected']['probabilities_fp32'])
    tol = golden['expected']['tolerance']
    sidecar = read_sidecar(golden['plans'][precision])
    assert sidecar.data['precision'] == precision and sidecar.data['gpu']['name'] == ENV.gpus[0].name
    with TrtRunner(golden['plans'][precision]) as runner:
        probs = runner.predict(np.concatenate([golden['patches']] * 5))  # 320 patches: above the profile max
    probs = probs[:len(expected)]
    assert expected[:, 1].std() > 0.05
    diff = np.abs(probs - expected).max()
    if precision == 'fp32':
        assert diff <= tol['fp32_engine_max_abs_prob_diff']
    else:
        assert diff <= tol['fp16_engine_max_abs_prob_diff']
        assert (probs.argmax(1) == expected.argmax(1)).mean() >= tol['fp16_engine_min_decision_agreement']


def test_cpp_runner_matches_onnxruntime(golden: dict, tmp_path: Path) -> None:
    if not CPP_RUNNER.is_file():
        pytest.skip(f'C++ runner not built at {CPP_RUNNER} (cmake -S export/cpp -B export/cpp/build '
                    '-DTENSORRT_ROOT=... && cmake --build export/cpp/build, or set PCAM_TRT_INFER)')
    out = tmp_path / 'predictions.json'
    subprocess.run([str(CPP_RUNNER), '--engine', str(golden['plans']['fp16']), '--format', 'json', '--output',
                    str(out), '--quiet', str(golden['files']['patches'])], check=True)
    predictions = json.loads(out.read_text())['predictions']
    probs = np.asarray([p['probabilities'] for p in sorted(predictions, key=lambda p: p['index'])])
    expected = np.asarray(golden['expected']['probabilities_fp32'])
    assert np.abs(probs - expected).max() <= golden['expected']['tolerance']['fp16_engine_max_abs_prob_diff']


def test_runner_refuses_a_plan_for_another_tensorrt(golden: dict, tmp_path: Path) -> None:
    plan = golden['plans']['fp16']
    copy = tmp_path / plan.name
    copy.write_bytes(plan.read_bytes())
    data = json.loads(Path(f'{plan}.json').read_text())
    data['tensorrt_version'] = '10.0.0.0'
    Path(f'{copy}.json').write_text(json.dumps(data))
    with pytest.raises(PlanMismatchError, match='TensorRT 10.0.0.0'):
        TrtRunner(copy)
