"""The export commands as a user meets them: every user error is one line and exit 2, and nothing is written."""
import subprocess
import sys
from pathlib import Path

import pytest

from timm_inception_pcam.errors import cli


def _one_line(capsys: pytest.CaptureFixture, expected: str) -> None:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert len(err) == 1 and expected in err[0] and 'Traceback' not in err[0], err


@pytest.mark.parametrize('extra, expected', [
    (['--model', 'inception_v4_pcam', '--batch-size', '0'], '--batch-size must be >= 1, got 0'),
    (['--model', 'inception_v4_pcam', '--parity-samples', '-1'], '--parity-samples must be >= 1'),
    (['--model', 'inception_v4_pcam', '--opset', '11'], '--opset must be >= 18'),
    (['--model', 'inception_v4_pcam', '--tolerance', '0'], '--tolerance must be > 0'),
    (['--model', 'inception_v4_pcam', '--opset', '999'], '--opset must be >= 18 and <= '),
    (['--model', 'inception_v4_pcam', '--name', '../escape'], "--name '../escape': expected a file stem"),
    (['--model', 'inception_v4_pcam', '--name', ''], "--name '': expected a file stem"),
    (['--model', 'no_such_model'], "--model: unknown model 'no_such_model'"),
    ([], 'give --model, --checkpoint, or both'),
    (['--checkpoint', '{tmp}/missing.pth'], 'missing.pth: checkpoint file not found'),
])
def test_export_onnx_user_errors(extra, expected, tmp_path: Path, capsys) -> None:
    from export.onnx import main

    out = tmp_path / 'out'
    assert cli(main, 'python -m export.onnx', ['--output', str(out), *[a.format(tmp=tmp_path) for a in extra]]) == 2
    _one_line(capsys, expected)
    assert not out.exists() or not any(out.iterdir())  # nothing under its final name (nor any name)
    assert not (tmp_path / 'escape.onnx').exists()


@pytest.mark.parametrize('command', ['openvino', 'triton'])
def test_the_other_exports_check_the_same_options(command: str, tmp_path: Path, capsys) -> None:
    import importlib

    main = importlib.import_module(f'export.{command}').main
    out = ['--model-repository' if command == 'triton' else '--output', str(tmp_path / 'out')]
    assert cli(main, f'python -m export.{command}', ['--model', 'inception_v4_pcam', *out, '--name', '../x']) == 2
    _one_line(capsys, "--name '../x': expected " + ('a model name for the repository' if command == 'triton' else
                                                     'a file stem'))
    assert not list(tmp_path.iterdir())


def test_broken_onnx_files_are_named(tmp_path: Path, capsys) -> None:
    from export.fp16 import main
    from timm_inception_pcam.evaluate import main as evaluate_main

    empty, garbage, notmodel = tmp_path / 'empty.onnx', tmp_path / 'garbage.onnx', tmp_path / 'text.onnx'
    empty.write_bytes(b'')
    garbage.write_bytes(b'\x08\x07\x12\xff\xff\xff garbage')
    notmodel.write_text('hello')
    for path, expected in ((empty, 'empty.onnx: empty file (0 bytes)'),
                           (garbage, 'garbage.onnx: not a readable ONNX model'),
                           (notmodel, 'text.onnx: not'),
                           (tmp_path / 'none.onnx', 'none.onnx: ONNX file not found'),
                           (tmp_path, f'{tmp_path}: a folder, expected an ONNX file')):
        assert cli(main, 'python -m export.fp16', ['--onnx', str(path)]) == 2
        _one_line(capsys, expected)
    assert cli(evaluate_main, 'evaluate', ['--checkpoint', str(garbage), '--data-dir', str(tmp_path),
                                           '--output', str(tmp_path / 'e')]) == 2
    assert 'Traceback' not in capsys.readouterr().err
    assert cli(main, 'python -m export.fp16', ['--onnx', str(garbage), '--batch-size', '0']) == 2
    _one_line(capsys, '--batch-size must be >= 1')
    assert cli(main, 'python -m export.fp16', ['--onnx', str(garbage), '--data-max', '-1']) == 2
    _one_line(capsys, '--data-max must be > 0 and <= 65504.0, got -1.0')


def test_export_trt_checks_its_options_before_the_export(tmp_path: Path, capsys, monkeypatch) -> None:
    import export.trt

    monkeypatch.setattr(export.trt, 'onnx_stage_from_args', lambda args: pytest.fail('exported before checking'))
    (tmp_path / 'afile').write_text('not a folder')
    for extra, expected in ((['--output', str(tmp_path / 'afile')], 'afile is an existing file; expected a folder'),
                            (['--output', str(tmp_path / 'out'), '--data-max', '0'], '--data-max must be > 0')):
        assert cli(export.trt.main, 'python -m export.trt', ['--fp16', '--model', 'inception_v4_pcam', *extra]) == 2
        _one_line(capsys, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['afile']


def test_triton_user_errors(tmp_path: Path, capsys) -> None:
    pytest.importorskip('tritonclient.grpc', reason='tritonclient is a declared dependency (serve extra)')
    from export.triton import main

    base = ['--model', 'inception_v4_pcam', '--model-repository', str(tmp_path / 'repo')]
    assert cli(main, 'python -m export.triton', [*base, '--max-batch-size', '0']) == 2
    _one_line(capsys, '--max-batch-size must be >= 1')
    assert cli(main, 'python -m export.triton', [*base, '--plan', str(tmp_path / 'x.plan')]) == 2
    _one_line(capsys, 'x.plan: file not found')
    for unused in (['--output', 'x'], ['--tolerance', '1'], ['--bake-preprocessing']):  # accepted, then ignored before
        with pytest.raises(SystemExit, match='2'):
            main([*base, *unused])
        _one_line(capsys, f'unrecognized arguments: {" ".join(unused)}')
    assert not (tmp_path / 'repo').exists()


def test_non_json_model_kwargs_in_safetensors_is_one_line(tmp_path: Path, capsys) -> None:
    import torch
    from safetensors.torch import save_file

    from timm_inception_pcam.checkpoint import load_model
    from timm_inception_pcam.errors import CheckpointError

    path = tmp_path / 'w.safetensors'
    save_file({'x': torch.zeros(1)}, str(path), metadata={'arch': 'inception_v4_pcam', 'model_kwargs': '{not json'})
    with pytest.raises(CheckpointError, match='w.safetensors'):
        load_model(None, path)


@pytest.mark.parametrize('module', ['export.onnx', 'export.fp16', 'export.golden', 'export.openvino'])
def test_modules_exit_2_without_traceback(module: str, tmp_path: Path) -> None:
    args = {'export.fp16': ['--onnx', str(tmp_path / 'none.onnx')],
            'export.golden': ['--output', str(tmp_path / 'g'), '--patches', '0']}.get(
        module, ['--model', 'inception_v4_pcam', '--output', str(tmp_path / 'o'), '--batch-size', '0'])
    proc = subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_pretrained_weights_out_of_reach_are_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    """--pretrained with no network and nothing cached: one line naming the model and the way out (a 60-line
    huggingface_hub traceback before)."""
    from export.onnx import main

    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr('huggingface_hub.constants.HF_HUB_CACHE', str(tmp_path / 'empty-cache'))  # nothing cached
    monkeypatch.setattr('huggingface_hub.constants.HF_HUB_OFFLINE', True)
    assert cli(main, 'python -m export.onnx', ['--model', 'inception_v4_pcam', '--pretrained', '--model-kwargs',
                                               'depths=1,1,1', '--output', str(tmp_path / 'out')]) == 2
    _one_line(capsys, 'inception_v4_pcam: pretrained weights could not be loaded')
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('name, kind', [('m.onnx', 'ONNX'), ('m.xml', 'OpenVINO'), ('m.plan', 'TensorRT')])
def test_an_exported_model_where_a_checkpoint_is_needed_is_named(name: str, kind: str, tmp_path) -> None:
    """export.triton --checkpoint m.onnx said 'cannot load as a weights-only PyTorch checkpoint'."""
    from timm_inception_pcam.checkpoint import CheckpointError, read_checkpoint

    (tmp_path / name).write_bytes(b'exported')
    with pytest.raises(CheckpointError, match=f'{name}: an exported {kind} model; this needs the PyTorch checkpoint'):
        read_checkpoint(tmp_path / name)
