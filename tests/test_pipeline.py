"""The README's main job, end to end on a reduced-depth model: every artefact it promises is there and consistent."""
import json
from pathlib import Path

import pytest

from timm_inception_pcam.pipeline import main


@pytest.fixture(scope='module')
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp('demo')
    summary = main(['--output', str(out), '--model-kwargs', 'depths=1,1,1', '--n-train', '128', '--n-eval', '32',
                    '--epochs', '1', '--batch-size', '32', '--tta', '2', '--workers', '0'])
    return out, summary


def test_pipeline_writes_every_artefact(demo: tuple[Path, dict]) -> None:
    out, summary = demo
    names = {p.name for p in (out / 'data').iterdir()}
    for split in ('train', 'valid', 'test'):
        assert {f'camelyonpatch_level_2_split_{split}_{k}' for k in ('x.h5', 'y.h5', 'meta.csv')} <= names
    report = json.loads((out / 'evaluate' / 'report.json').read_text())
    assert report['split'] == 'test' and report['threshold']['source'] == 'valid' and report['tta'] == 2
    for plot in ('roc.png', 'pr.png', 'confusion.png'):
        assert (out / 'evaluate' / plot).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    export = out / 'export'
    assert (export / 'inception_v4_pcam.onnx').is_file() and (export / 'inception_v4_pcam.fp16.onnx').is_file()
    assert json.loads((export / 'inception_v4_pcam.onnx.parity.json').read_text())['passed'] is True
    assert (export / 'inception_v4_pcam.fp16.parity.json').is_file()
    hub = Path(summary['artefacts']['hub_folder'])
    assert {'model.safetensors', 'config.json', 'README.md'} <= {p.name for p in hub.iterdir()}
    assert not list(hub.glob('*.bin')) and not list(hub.glob('*.pth'))
    assert summary['artefacts']['tensorrt'].startswith(('engine built', 'not built here'))
    assert summary['artefacts']['upload_command'].startswith('python -m timm_inception_pcam.publish --checkpoint ')
    assert summary['artefacts']['upload_command'].endswith(' --allow-synthetic')
    assert ' --repo-id your-hf-user/inception_v4_pcam-synthetic-demo ' in summary['artefacts']['upload_command']
    ir = Path(summary['artefacts']['openvino_ir'])
    assert ir.is_file() and ir.with_suffix('.bin').is_file()
    assert json.loads((export / 'openvino' / 'inception_v4_pcam.xml.parity.json').read_text())['passed'] is True
    repo = Path(summary['artefacts']['triton_repository'])
    assert summary['artefacts']['triton_models'] == ['inception_v4_pcam_onnx', 'inception_v4_pcam_openvino']
    assert all((repo / m / 'config.pbtxt').is_file() for m in summary['artefacts']['triton_models'])
    assert 'export.trt --fp16 --from-onnx' in summary['artefacts']['triton_left_out']['inception_v4_pcam_tensorrt']


def test_provenance_is_synthetic_from_data_to_card(demo: tuple[Path, dict]) -> None:
    from timm_inception_pcam.checkpoint import read_checkpoint

    out, summary = demo
    report = json.loads((out / 'evaluate' / 'report.json').read_text())
    assert report['data']['provenance'] == 'synthetic' and 'not a PCam result' in report['data']['note']
    assert read_checkpoint(summary['artefacts']['checkpoint'])['data_provenance'] == 'synthetic'
    hub = Path(summary['artefacts']['hub_folder'])
    card = (hub / 'README.md').read_text()
    assert 'synthetic' in card.lower() and '1aurent/PatchCamelyon' not in card


def test_pipeline_summary_matches_report(demo: tuple[Path, dict]) -> None:
    out, summary = demo
    report = json.loads((out / 'evaluate' / 'report.json').read_text())
    saved = json.loads((out / 'pipeline.json').read_text())
    assert saved['test'] == summary['test']
    assert saved['test']['roc_auc'] == report['metrics']['roc_auc']
    card = (Path(summary['artefacts']['hub_folder']) / 'README.md').read_text()
    assert 'library_name: timm' in card and f"{report['metrics']['roc_auc']:.4f}"[:5] in card


def _exit_2(capsys, argv: list[str]) -> str:
    from timm_inception_pcam.errors import cli

    assert cli(main, 'pipeline', argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith('pipeline: error: ')]
    assert len(lines) == 1 and 'Traceback' not in err, err
    return lines[0]


@pytest.mark.parametrize('extra, needle', [
    (('--epochs', '0'), '--epochs must be >= 1, got 0'),
    (('--batch-size', '0'), '--batch-size must be >= 1, got 0'),
    (('--lr', '0'), '--lr must be > 0'),
    (('--n-train', '1'), '--n-train must be >= 2, got 1'),
    (('--tta', '9'), '--tta must be >= 1 and <= 8, got 9'),
    (('--workers', '-2'), '--workers must be >= 0 and <= 256, got -2'),
    (('--n-train', '16'), '--n-train 16 makes no full batch of --batch-size 32: raise --n-train or lower'),
    (('--repo-id', 'bad id'), "--repo-id 'bad id': expected ORG/NAME"),
    (('--model', 'nope'), "--model 'nope': not a registered timm model"),
    (('--model-kwargs', 'foo=1'), "inception_v4_pcam does not take 'foo'"),
])
def test_bad_values_exit_2_before_any_work(tmp_path, capsys, extra, needle) -> None:
    out = tmp_path / 'demo'
    assert needle in _exit_2(capsys, ['--output', str(out), *extra])
    assert not out.exists(), 'nothing is written for a refused run'


def test_output_naming_a_file_exits_2(tmp_path, capsys) -> None:
    afile = tmp_path / 'demo'
    afile.write_text('x')
    assert f'--output {afile} is an existing file' in _exit_2(capsys, ['--output', str(afile)])


def test_second_run_is_refused_then_replaced_with_overwrite(demo: tuple[Path, dict], capsys) -> None:
    """Running the main job twice into one folder: refused, naming --overwrite; with --overwrite the previous run is
    replaced (here by a run without the export step, so the old export folder must be gone)."""
    out, _ = demo
    before = (out / 'pipeline.json').read_text()
    line = _exit_2(capsys, ['--output', str(out)])
    assert f'--output {out} already holds a run' in line and 'pass --overwrite to replace it' in line
    assert (out / 'pipeline.json').read_text() == before, 'a refused run touches nothing'
    summary = main(['--output', str(out), '--overwrite', '--model-kwargs', 'depths=1,1,1', '--n-train', '64',
                    '--n-eval', '16', '--epochs', '1', '--batch-size', '16', '--workers', '0', '--no-export',
                    '--no-progress'])
    assert not (out / 'export').exists() and 'export' not in summary['artefacts']
    saved = json.loads((out / 'pipeline.json').read_text())
    assert saved['config']['n_train'] == 64 and saved['data'] == 'synthetic'
    assert not (out / '.lock').exists()


def test_a_failed_overwrite_brings_the_previous_run_back(demo: tuple[Path, dict], monkeypatch) -> None:
    import timm_inception_pcam.data

    out, _ = demo
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob('*')}

    def full_disk(data_dir: Path, **kwargs):
        (data_dir / 'half.h5').parent.mkdir(parents=True)
        (data_dir / 'half.h5').write_bytes(b'half a file')
        raise OSError(28, 'No space left on device', str(data_dir / 'half.h5'))

    monkeypatch.setattr(timm_inception_pcam.data, 'synthesize_pcam', full_disk)
    with pytest.raises(OSError, match='No space'):
        main(['--output', str(out), '--overwrite', '--model-kwargs', 'depths=1,1,1', '--no-progress'])
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob('*')} == before


SMALL = ['--model-kwargs', 'depths=1,1,1', '--n-train', '64', '--n-eval', '16', '--epochs', '1', '--batch-size', '16',
         '--workers', '0', '--no-export', '--no-progress']


def test_an_unfinished_run_is_replaced_without_overwrite(tmp_path: Path, monkeypatch, capsys) -> None:
    import timm_inception_pcam.pipeline as pipeline

    out = tmp_path / 'demo'

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, 'train', interrupted)  # Ctrl-C in step 2: the synthetic data are there
    with pytest.raises(KeyboardInterrupt):
        main(['--output', str(out), *SMALL])
    assert (out / 'data').is_dir() and (out / pipeline.STARTED).exists() and not (out / 'pipeline.json').exists()
    monkeypatch.undo()
    summary = main(['--output', str(out), *SMALL])  # "rerun to replace": no --overwrite needed for leftovers
    assert summary['config']['n_train'] == 64 and not (out / pipeline.STARTED).exists()
    assert sorted(p.name for p in out.iterdir()) == ['data', 'evaluate', 'hub', 'pipeline.json', 'train']

    foreign = tmp_path / 'project'
    (foreign / 'data').mkdir(parents=True)  # a folder of the user's that merely has a 'data' in it
    line = _exit_2(capsys, ['--output', str(foreign), *SMALL])
    assert 'already holds a run (data)' in line and (foreign / 'data').is_dir()


def test_makefile_demo_replaces_the_previous_run() -> None:
    """`make demo` twice must work: the Makefile's demo target passes --overwrite."""
    makefile = (Path(__file__).resolve().parents[1] / 'Makefile').read_text()
    (line,) = [ln for ln in makefile.splitlines() if 'timm_inception_pcam.pipeline' in ln]
    assert '--overwrite' in line.split()


def test_command_exits_2_without_traceback(tmp_path) -> None:
    """The real entry point (`python -m timm_inception_pcam.pipeline`) goes through errors.cli."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    run = subprocess.run([sys.executable, '-m', 'timm_inception_pcam.pipeline', '--output', str(tmp_path / 'd'),
                          '--epochs', '0'], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ['pipeline: error: --epochs must be >= 1, got 0'], run.stderr
