"""`python -m benchmarks.gpu_check` in its CPU form: step 1 recorded, steps 2-5 skipped with the reason, both files
written, exit 0; a failing step exits 1; the budget skips steps with the reason; user errors exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]


def _read(out: Path) -> tuple[dict, str]:
    return json.loads((out / 'gpu_check.json').read_text()), (out / 'gpu_check.md').read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason='a CUDA device is present: the steps would run, not skip')
def test_without_a_gpu_steps_are_skipped_with_the_reason(tmp_path: Path) -> None:
    out = tmp_path / 'check'
    proc = subprocess.run([sys.executable, '-m', 'benchmarks.gpu_check', '--output', str(out), '--quick'],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results, md = _read(out)
    assert results['format'] == gpu_check.FORMAT and list(results['steps']) == list(gpu_check.STEPS)
    env = results['steps']['environment']
    assert env['status'] == 'ok' and env['torch'] == torch.__version__ and env['timm']
    assert env['gpus'] == [] and env['gpu_problem'] and env['tensorrt'] is None and env['tensorrt_problem']
    for name in gpu_check.STEPS[1:]:
        step = results['steps'][name]
        assert step['status'] == 'skipped' and 'no CUDA GPU' in step['reason'], (name, step)
    assert results['failed'] == []
    assert 'synthetic' in md and '| training | skipped |' in md and 'no CUDA GPU' in md
    assert 'gpu_check: 1 ok, 4 skipped, 0 failed' in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ['gpu_check.json', 'gpu_check.md', 'work']  # no temporaries


def test_a_failing_step_is_recorded_and_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(ctx):
        raise RuntimeError('CUDA error: an illegal memory access was encountered')

    monkeypatch.setitem(gpu_check.STEP_FUNCTIONS, 'inference', broken)
    monkeypatch.setattr(gpu_check, '_device', lambda requested: (torch.device('cpu'), None))
    assert gpu_check.main(['--output', str(tmp_path), '--quick', '--steps', 'environment,inference']) == 1
    results, md = _read(tmp_path)
    step = results['steps']['inference']
    assert step['status'] == 'failed' and 'illegal memory access' in step['reason'] and 'Traceback' in step['traceback']
    assert results['failed'] == ['inference']
    assert results['steps']['training'] == {'status': 'skipped', 'reason': 'not selected (--steps)', 'seconds': 0.0}
    assert '| inference | failed |' in md


def test_training_checks_fail_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose loss does not fall (or goes non-finite) fails the training step, which fails the command."""
    def flat_run(ctx, name, precision, x, y):
        return {'model': name, 'precision': precision, 'batch': 8, 'steps': 4, 'patches_per_s': 10.0,
                'peak_memory_gib': None, 'losses_per_chunk': [0.7, 0.71], 'scaler_skipped_steps': 0,
                'checks': {'loss_decreasing': False, 'finite': True, 'scaler_skips_ok': True}}

    monkeypatch.setattr(gpu_check, '_train_run', flat_run)
    monkeypatch.setattr(gpu_check, '_synthetic', lambda ctx: {'fit': (torch.zeros(2, 96, 96, 3, dtype=torch.uint8)
                                                                       .numpy(), torch.zeros(2).long().numpy())})
    monkeypatch.setattr(gpu_check, '_device', lambda requested: (torch.device('cpu'), None))
    assert gpu_check.main(['--output', str(tmp_path), '--quick', '--steps', 'training']) == 1
    results, md = _read(tmp_path)
    step = results['steps']['training']
    assert step['status'] == 'failed' and 'inception_v4_pcam bf16: loss_decreasing' in step['reason']
    assert [r['precision'] for r in step['runs']] == ['bf16', 'bf16']  # on the CPU fp16 runs are skipped, saying why
    assert [s['precision'] for s in step['skipped']] == ['fp16', 'fp16'] and 'CUDA only' in step['skipped'][0]['reason']
    assert 'FAILED: loss_decreasing' in md and 'Training (synthetic PCam)' in md


def test_budget_skips_the_remaining_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check, '_device', lambda requested: (torch.device('cpu'), None))
    assert gpu_check.main(['--output', str(tmp_path), '--budget-s', '1e-9', '--quick']) == 0
    results, _ = _read(tmp_path)
    assert results['steps']['environment']['status'] == 'ok'  # always recorded
    for name in gpu_check.STEPS[1:]:
        assert results['steps'][name]['status'] == 'skipped'
        assert 'out of time' in results['steps'][name]['reason'] and 'budget' in results['steps'][name]['reason']


def test_markdown_shows_every_measured_table() -> None:
    row = {'items_per_s': 1000.0, 'latency_ms': 64.0, 'tflops': 1.46, 'utilisation': 0.0015, 'median_s': 0.064}
    results = {
        'quick': False, 'device': 'cuda', 'budget_s': 450, 'seconds': 400,
        'steps': {
            'environment': {'status': 'ok', 'seconds': 1, 'gpus': [{'name': 'NVIDIA H200', 'memory_gib': 139.8,
                                                                     'compute_capability': '9.0'}],
                            'driver': '13.0', 'torch': '2.14', 'torch_cuda': '13.0', 'cudnn': 92400, 'timm': '1.0.31',
                            'onnxruntime': '1.32', 'tensorrt': None, 'pycuda': False},
            'cuda_tests': {'status': 'ok', 'seconds': 30, 'command': '-m pytest -m cuda', 'summary': '5 passed'},
            'inference': {'status': 'ok', 'seconds': 60, 'device': 'NVIDIA H200', 'peak_fp16_tflops': 989.0,
                          'models': [{'model': 'inception_v4_pcam', 'variants': {
                              'fp16': {'status': 'ok', 'batches': {'64': row}},
                              'fp16_compile': {'status': 'ok', 'mode': 'default', 'compile_s': 80.0,
                                               'batches': {'256': row}},
                              'bf16': {'status': 'skipped', 'reason': 'out of time'}}}]},
            'fp16_numerics': {'status': 'ok', 'seconds': 20, 'model': 'inception_v4_pcam', 'weights': 'trained',
                              'patches': '512 labelled synthetic test patches',
                              'torch_fp16_vs_fp32': {'decision_agreement': 0.998, 'roc_auc_change': -1e-4,
                                                     'max_abs_prob_diff': 0.01},
                              'onnx_fp16_vs_fp32': {'decision_agreement': 1.0, 'auc_change': 0.0,
                                                    'max_abs_prob_diff': 0.002}},
        }}
    md = gpu_check.render_markdown(results)
    assert 'NVIDIA H200 (139.8 GiB, cc 9.0)' in md and '5 passed' in md
    assert '| inception_v4_pcam | fp16 | 64 | 1,000 | 64 | 1.46 | 0.1% |' in md
    assert 'fp16_compile (default, compiled in 80 s)' in md and '| bf16 | | skipped: out of time |' in md
    assert '| PyTorch fp16 vs fp32 | 0.998 |' in md and '| FP16 ONNX vs FP32 ONNX (onnxruntime) | 1 |' in md
    assert 'synthetic' in md


@pytest.mark.parametrize('argv, message', [(['--budget-s', '-5'], '--budget-s must be > 0'),
                                           (['--steps', 'environment,warp'], 'unknown step(s) warp')])
def test_user_errors_exit_2_with_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, '-m', 'benchmarks.gpu_check', '--output', str(tmp_path), *argv],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and 'Traceback' not in proc.stderr


def test_flops_against_the_h200_peak() -> None:
    from benchmarks.gpu import add_flops, peak_fp16_tflops

    assert peak_fp16_tflops('NVIDIA H200') == 989.0 and peak_fp16_tflops('Some Future GPU') is None
    row = add_flops({'items_per_s': 100_000.0}, gmacs=0.73, peak_tflops=989.0)
    assert row['tflops'] == pytest.approx(146.0) and row['utilisation'] == pytest.approx(146.0 / 989.0)
    assert add_flops({'items_per_s': 5.0}, gmacs=0.73, peak_tflops=None)['utilisation'] is None
