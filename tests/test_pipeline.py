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
    assert summary['artefacts']['upload_command'].startswith('hf upload ')


def test_pipeline_summary_matches_report(demo: tuple[Path, dict]) -> None:
    out, summary = demo
    report = json.loads((out / 'evaluate' / 'report.json').read_text())
    saved = json.loads((out / 'pipeline.json').read_text())
    assert saved['test'] == summary['test']
    assert saved['test']['roc_auc'] == report['metrics']['roc_auc']
    card = (Path(summary['artefacts']['hub_folder']) / 'README.md').read_text()
    assert 'library_name: timm' in card and f"{report['metrics']['roc_auc']:.4f}"[:5] in card
