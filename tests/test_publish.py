"""Publishing to the Hugging Face Hub (dry run, refusals, no duplicate commit) and loading back offline with timm."""
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from timm.data import resolve_data_config

from timm_inception_pcam import errors, hub
from timm_inception_pcam.checkpoint import load_model, read_checkpoint, save_checkpoint
from timm_inception_pcam.constants import LABEL_NAMES, PCAM_MEAN, PCAM_STD
from timm_inception_pcam.data.provenance import provenance_of
from timm_inception_pcam.hub import OFFICIAL_REPOS, PublishError, main
from timm_inception_pcam.hub.card import render_card
from timm_inception_pcam.hub.report import path_inside, report_provenance
from timm_inception_pcam.storage import file_sha256

ORG = 'pcam-test-org'
# non-default architecture arguments, so that config.json must carry them for the model to load back
MODEL_KWARGS = {
    'inception_v4_pcam': {'depths': [1, 1, 1], 'stem_stride': 1},
    'inception_resnet_v2_pcam': {'depths': [1, 1, 1]},
}


def _randomise_bn(model: torch.nn.Module, seed: int) -> None:
    """Give BatchNorm buffers non-default values, so that identical weights also means identical statistics."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _make_run(root: Path, arch: str, seed: int) -> dict[str, Any]:
    """A trained-looking run: checkpoint, plots and a matching evaluation report with seed-dependent metrics."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=2, **MODEL_KWARGS[arch])
    _randomise_bn(model, seed)
    recipe = {'train_args': {'lr': 0.01, 'epochs': 30, 'opt': 'adamw', 'data_dir': '/private/pcam'}} \
        if arch == 'inception_v4_pcam' else {}  # the trainer's model_best.pth records its run's recipe
    ckpt = save_checkpoint(root / 'model_best.pth', model, arch=arch, model_kwargs=MODEL_KWARGS[arch], epoch=7,
                           metrics={'val_roc_auc': 0.9}, weights='model', selection='val_roc_auc', **recipe)
    rng = np.random.default_rng(seed)
    colours = {'roc': (200, 0, 0), 'pr': (0, 200, 0), 'confusion': (0, 0, 200)}
    for name, colour in colours.items():
        Image.new('RGB', (16, 12), colour).save(root / f'{name}.png')
    metrics = {k: float(rng.uniform(0.7, 0.99)) for k in (
        'accuracy', 'roc_auc', 'f1', 'weighted_f1', 'precision', 'recall', 'balanced_accuracy', 'average_precision')}
    metrics.update(nll=0.31, ece=0.02, tp=40, fp=6, tn=45, fn=9, tpr=0.82, fpr=0.12)
    report = {
        'format': 'timm-inception-pcam-report/1', 'model': arch, 'checkpoint': str(ckpt),
        'checkpoint_sha256': file_sha256(ckpt), 'split': 'test', 'n': 100, 'tta': 8,
        'threshold': {'value': 0.42, 'source': 'valid'}, 'metrics': metrics,
        'ci95': {'roc_auc': [metrics['roc_auc'] - 0.02, metrics['roc_auc'] + 0.01]},
        'tta_gain': None, 'plots': {'roc': 'roc.png', 'pr': 'pr.png', 'confusion': 'confusion.png'},
        'normalization': {'mean': list(PCAM_MEAN), 'std': list(PCAM_STD)}, 'use_ema': False,
        'data': {'provenance': 'pcam'},  # as evaluate records it for the real PCam files
    }
    (root / 'report.json').write_text(json.dumps(report))
    return {'arch': arch, 'dir': root, 'checkpoint': ckpt, 'report': root / 'report.json', 'report_data': report,
            'model': model.eval()}


def _argv(run: dict[str, Any], output: Path, repo: str, *extra: str) -> list[str]:
    return ['--checkpoint', str(run['checkpoint']), '--report', str(run['report']), '--repo-id', repo,
            '--output', str(output), *extra]


@pytest.fixture(scope='module')
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp('publish_runs')
    return {arch: _make_run(root / arch, arch, seed) for seed, arch in enumerate(MODEL_KWARGS, start=1)}


@pytest.fixture(scope='module')
def published(runs: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Dry-run folders for both models (shared by the folder and the loading-back tests)."""
    out = tmp_path_factory.mktemp('publish_out')
    return {arch: main(_argv(run, out, f'{ORG}/{arch}-tiny', '--dry-run')) for arch, run in runs.items()}


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _data_cfg(model: torch.nn.Module) -> dict[str, Any]:
    cfg = resolve_data_config({}, model=model)
    return {k: tuple(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k]
            for k in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation')}


EXPECTED_DATA_CFG = {'input_size': (3, 96, 96), 'mean': PCAM_MEAN, 'std': PCAM_STD, 'crop_pct': 1.0,
                     'interpolation': 'bilinear'}


# ------------------------------------------------------------------------------------------------ the folder


@pytest.mark.parametrize('arch', list(MODEL_KWARGS))
def test_dry_run_writes_hub_folder(arch: str, runs: dict, published: dict) -> None:
    run, result = runs[arch], published[arch]
    folder = Path(result['folder'])
    assert folder.name == f'{arch}-tiny'
    assert set(result['files']) == {'README.md', 'config.json', 'model.safetensors', 'roc.png', 'pr.png',
                                    'confusion.png'}
    assert sorted(p.name for p in folder.iterdir()) == sorted(result['files'])  # no pickle, no leftovers
    assert not result['uploaded']
    assert result['upload_command'].startswith(f'hf upload {ORG}/{arch}-tiny {folder} . ')

    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == arch and config['num_classes'] == 2
    assert config['label_names'] == list(LABEL_NAMES)
    for key, value in MODEL_KWARGS[arch].items():
        assert config['model_args'][key] == value
    cfg = config['pretrained_cfg']
    assert cfg['input_size'] == [3, 96, 96] and cfg['crop_pct'] == 1.0
    assert cfg['mean'] == list(PCAM_MEAN) and cfg['std'] == list(PCAM_STD)
    assert cfg['label_names'] == list(LABEL_NAMES)
    # the pooled grid is measured: 96 px with the stride-1 stem ends on 6x6, the stride-2 stems on 3x3
    assert cfg['pool_size'] == ([6, 6] if MODEL_KWARGS[arch].get('stem_stride') == 1 else [3, 3])
    provenance = config[hub.PROVENANCE_KEY]
    assert provenance['checkpoint_sha256'] == file_sha256(run['checkpoint'])
    assert provenance['report_sha256'] == file_sha256(run['report'])
    assert provenance['weights_sha256'] == file_sha256(folder / 'model.safetensors')

    _same_weights(load_file(folder / 'model.safetensors'), read_checkpoint(run['checkpoint'])['state_dict'])
    for plot in ('roc.png', 'pr.png', 'confusion.png'):
        assert (folder / plot).read_bytes() == (run['dir'] / plot).read_bytes()


@pytest.mark.parametrize('arch', list(MODEL_KWARGS))
def test_model_card_front_matter_and_sections(arch: str, runs: dict, published: dict) -> None:
    report = runs[arch]['report_data']
    text = (Path(published[arch]['folder']) / 'README.md').read_text()
    card = ModelCard(text)
    assert card.data.library_name == 'timm' and card.data.pipeline_tag == 'image-classification'
    assert card.data.license == 'apache-2.0' and card.data.datasets == [hub.DEFAULT_DATASET_ID]
    assert {'timm', 'pathology', 'patchcamelyon'} <= set(card.data.tags)
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {'accuracy', 'roc_auc', 'f1', 'balanced_accuracy'}
    for key, result in results.items():
        assert result.metric_value == pytest.approx(report['metrics'][key], abs=1e-6)
        assert result.dataset_split == 'test' and result.task_type == 'image-classification'
    for needle in (f'hf-hub:{ORG}/{arch}-tiny', 'onnxruntime', 'trtexec', 'Not a medical device', '](roc.png)',
                   '](pr.png)', f'{report["metrics"]["roc_auc"]:.4f}', 'Checkpoint epoch (counted from 0): 7',
                   '"depths": [1, 1, 1]', '![confusion matrix](confusion.png)', '![ROC curve](roc.png)'):
        assert needle in text, needle
    assert str(runs[arch]['dir']) not in text  # no local paths in a public card
    if arch == 'inception_v4_pcam':
        assert '| lr | `0.01` |' in text and '| opt | `"adamw"` |' in text and '/private/pcam' not in text
    else:
        assert 'training arguments were not recorded' in text


# ---------------------------------------------------------------------------------------------- loading back


def _hf_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """Lay `folder` out as a Hugging Face hub cache entry (models--ORG--NAME/snapshots/<sha>, refs/main)."""
    hub = root / 'hub'
    entry = hub / f'models--{repo_id.replace("/", "--")}'
    sha = hashlib.sha1(str(folder).encode()).hexdigest()
    snapshot = entry / 'snapshots' / sha
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (entry / 'refs').mkdir()
    (entry / 'refs' / 'main').write_text(sha)
    return hub


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HOME / HF_HUB_CACHE in tmp_path, offline. huggingface_hub reads them at import, so its constants too."""
    import huggingface_hub.constants as hf_constants

    home, hub = tmp_path / 'hf', tmp_path / 'hf' / 'hub'
    monkeypatch.setenv('HF_HOME', str(home))
    monkeypatch.setenv('HF_HUB_CACHE', str(hub))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(hf_constants, 'HF_HOME', str(home))
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(hub))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    return home


@pytest.mark.parametrize('arch', list(MODEL_KWARGS))
def test_hf_hub_round_trip_offline(arch: str, runs: dict, published: dict, offline_cache: Path) -> None:
    repo_id = f'{ORG}/{arch}-tiny'
    _hf_cache(offline_cache, repo_id, Path(published[arch]['folder']))
    model = timm.create_model(f'hf-hub:{repo_id}', pretrained=True)
    assert type(model) is type(runs[arch]['model'])
    _same_weights(model.state_dict(), runs[arch]['model'].state_dict())
    assert _data_cfg(model) == EXPECTED_DATA_CFG
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), runs[arch]['model'](x), rtol=0, atol=0)
    with pytest.raises(Exception, match='(?i)offline|cache|not found|cannot find'):
        timm.create_model(f'hf-hub:{ORG}/not-published', pretrained=True)  # nothing else is reachable


@pytest.mark.parametrize('arch', list(MODEL_KWARGS))
def test_local_dir_round_trip(arch: str, runs: dict, published: dict) -> None:
    model = timm.create_model(f'local-dir:{published[arch]["folder"]}', pretrained=True)
    _same_weights(model.state_dict(), runs[arch]['model'].state_dict())
    assert _data_cfg(model) == EXPECTED_DATA_CFG


@pytest.mark.parametrize('arch', list(MODEL_KWARGS))
def test_the_weights_file_alone_loads(arch: str, runs: dict, published: dict) -> None:
    """The folder's model.safetensors given as a checkpoint: its architecture and arguments (depths here) come from
    the config.json beside it (before: 'records no arch'); the folder itself is refused with the two ways that work."""
    from timm_inception_pcam.checkpoint import load_model

    folder = Path(published[arch]['folder'])
    model = load_model(None, folder / 'model.safetensors')
    _same_weights(model.state_dict(), runs[arch]['model'].state_dict())
    with pytest.raises(errors.CheckpointError, match=f'a folder, expected a checkpoint file \\(a Hub folder: its '
                                              f'model.safetensors, or local-dir:{folder}\\)'):
        load_model(None, folder)


def test_hf_hub_round_trip_from_environment_only(runs: dict, published: dict, tmp_path: Path) -> None:
    """A fresh interpreter given only HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE (no patching) loads the repo."""
    arch = 'inception_resnet_v2_pcam'
    repo_id = f'{ORG}/{arch}-tiny'
    hub = _hf_cache(tmp_path / 'hf', repo_id, Path(published[arch]['folder']))
    out = tmp_path / 'loaded.safetensors'
    script = textwrap.dedent(f'''
        import json, timm, timm_inception_pcam
        from safetensors.torch import save_file
        from timm.data import resolve_data_config
        model = timm.create_model("hf-hub:{repo_id}", pretrained=True)
        save_file(model.state_dict(), {str(out)!r})
        print(json.dumps(resolve_data_config({{}}, model=model)))
    ''')
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGINGFACE_'))}
    env.update(HF_HOME=str(tmp_path / 'hf'), HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE='1')
    proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = json.loads(proc.stdout.strip().splitlines()[-1])
    assert tuple(cfg['mean']) == PCAM_MEAN and tuple(cfg['std']) == PCAM_STD
    assert tuple(cfg['input_size']) == (3, 96, 96) and cfg['crop_pct'] == 1.0
    _same_weights(load_file(out), runs[arch]['model'].state_dict())


def test_every_model_has_its_official_repo() -> None:
    """The official-repo refusal of synthetic weights covered inception_v4_pcam and inception_resnet_v2_pcam only."""
    assert set(OFFICIAL_REPOS) == set(timm.list_models('*_pcam')) and len(OFFICIAL_REPOS) == 7
    assert OFFICIAL_REPOS['googlenet_pcam'] == 'timm-inception-pcam/googlenet_pcam'


@pytest.mark.parametrize('arch', list(MODEL_KWARGS))
def test_pcam_tag_refuses_until_published(arch: str) -> None:
    with pytest.raises(RuntimeError) as e:
        timm.create_model(f'{arch}.pcam', pretrained=True)
    message = str(e.value)
    assert OFFICIAL_REPOS[arch] in message and f'{arch}.tf_in1k' in message and 'train' in message
    from timm_inception_pcam.models import _common
    assert not hasattr(_common, 'PCAM_WEIGHTS_PUBLISHED')  # no flag in source to edit once published
    assert timm.models.get_pretrained_cfg(f'{arch}.pcam').hf_hub_id == OFFICIAL_REPOS[arch]


# ------------------------------------------------------------------------------------------------- refusals


def _assert_refused(argv: list[str], output: Path, match: str) -> None:
    with pytest.raises(PublishError, match=match):
        main(argv)
    assert not output.exists() or not any(output.iterdir()), 'a refused publish must write nothing'


def test_refuses_without_report(runs: dict, tmp_path: Path) -> None:
    run = runs['inception_v4_pcam']
    argv = ['--checkpoint', str(run['checkpoint']), '--repo-id', f'{ORG}/x', '--output', str(tmp_path / 'out')]
    with pytest.raises(SystemExit) as exc:  # argparse's refusal, before "[1/5] reading report None"
        main(argv + ['--dry-run'])
    assert exc.value.code == 2 and not (tmp_path / 'out').exists()
    _assert_refused(argv + ['--report', str(tmp_path / 'missing.json'), '--dry-run'], tmp_path / 'out',
                    'missing.json: evaluation report not found')
    _assert_refused(argv + ['--report', str(run['report'].parent), '--dry-run'], tmp_path / 'out',
                    'a folder, expected its report.json')


def test_refuses_report_of_another_checkpoint(runs: dict, tmp_path: Path) -> None:
    v4, irv2 = runs['inception_v4_pcam'], runs['inception_resnet_v2_pcam']
    argv = ['--checkpoint', str(v4['checkpoint']), '--report', str(irv2['report']), '--repo-id', f'{ORG}/x',
            '--output', str(tmp_path / 'out'), '--dry-run']
    _assert_refused(argv, tmp_path / 'out', f'measured on another checkpoint.*{file_sha256(v4["checkpoint"])}')
    unmatched = dict(v4['report_data'], checkpoint_sha256=None)
    report = tmp_path / 'report.json'
    report.write_text(json.dumps(unmatched))
    argv[3] = str(report)
    _assert_refused(argv, tmp_path / 'out', 'checkpoint_sha256 is None')
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'not a checkpoint at all')
    argv[1], argv[3] = str(garbage), str(v4['report'])  # no "another checkpoint": it is no checkpoint
    _assert_refused(argv, tmp_path / 'out', 'garbage.pth: cannot load as a weights-only PyTorch checkpoint')


def test_refuses_report_of_other_weights(runs: dict, tmp_path: Path) -> None:
    argv = _argv(runs['inception_v4_pcam'], tmp_path / 'out', f'{ORG}/x', '--dry-run', '--use-ema')
    _assert_refused(argv, tmp_path / 'out', 'use_ema is false')  # the report measured the non-EMA weights
    argv = _argv(runs['inception_v4_pcam'], tmp_path / 'out', f'{ORG}/x', '--dry-run', '--mean', '0.5', '0.5', '0.5')
    _assert_refused(argv, tmp_path / 'out', r'--mean \[0.5, 0.5, 0.5\] differs from the mean')


def test_refuses_nan_weights(runs: dict, tmp_path: Path) -> None:
    run = runs['inception_v4_pcam']
    ckpt = read_checkpoint(run['checkpoint'])
    name = next(k for k, v in ckpt['state_dict'].items() if v.is_floating_point() and v.numel() > 1)
    ckpt['state_dict'][name] = ckpt['state_dict'][name].clone()
    ckpt['state_dict'][name].view(-1)[0] = float('nan')
    bad = tmp_path / 'nan.pth'
    torch.save(ckpt, bad)  # save_checkpoint itself refuses NaN, as it should
    report = dict(run['report_data'], checkpoint=str(bad), checkpoint_sha256=file_sha256(bad))
    (tmp_path / 'report.json').write_text(json.dumps(report))
    argv = ['--checkpoint', str(bad), '--report', str(tmp_path / 'report.json'), '--plots-dir', str(run['dir']),
            '--repo-id', f'{ORG}/x', '--output', str(tmp_path / 'out'), '--dry-run']
    _assert_refused(argv, tmp_path / 'out', f'NaN/Inf values in 1 tensors: {name} \\(1 of ')


def test_refuses_unknown_model(runs: dict, tmp_path: Path) -> None:
    run = runs['inception_v4_pcam']
    argv = _argv(run, tmp_path / 'out', f'{ORG}/x', '--dry-run')
    _assert_refused(argv + ['--model', 'inception_v9_pcam'], tmp_path / 'out', "unknown model 'inception_v9_pcam'")


def test_refuses_missing_plot_and_foreign_target(runs: dict, tmp_path: Path) -> None:
    run = runs['inception_v4_pcam']
    argv = _argv(run, tmp_path / 'out', f'{ORG}/x', '--dry-run', '--plots-dir', str(tmp_path))
    _assert_refused(argv, tmp_path / 'out', 'roc plot named by')
    foreign = tmp_path / 'out2' / 'x'
    foreign.mkdir(parents=True)
    (foreign / 'notes.txt').write_text('mine')
    with pytest.raises(PublishError, match='not a folder written by this command'):
        main(_argv(run, tmp_path / 'out2', f'{ORG}/x', '--dry-run'))
    assert [p.name for p in foreign.iterdir()] == ['notes.txt']


def test_cli_reports_refusal_in_one_line(runs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    argv = ['--checkpoint', str(runs['inception_v4_pcam']['checkpoint']), '--repo-id', f'{ORG}/x', '--output',
            str(tmp_path), '--dry-run', '--report', str(tmp_path / 'missing.json')]
    monkeypatch.setattr(sys, 'argv', ['publish', *argv])
    assert errors.cli(main, 'publish') == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('publish: error: ') and 'evaluation report not found' in err[0]
    assert 'reading report' in captured.out


# ------------------------------------------------------------------------------------- atomicity and ONNX


def test_failed_rebuild_keeps_previous_folder(runs: dict, published: dict, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(published['inception_v4_pcam']['folder'], tmp_path / 'x')  # an earlier publish folder
    before = {p.name: p.read_bytes() for p in (tmp_path / 'x').iterdir()}

    def fail(folder: Path, *args: Any) -> None:  # the last step, after every file of the new folder is written
        assert {'model.safetensors', 'README.md', 'config.json'} <= {p.name for p in folder.iterdir()}
        raise PublishError('simulated failure')

    monkeypatch.setattr(hub.folder, '_verify_loads_back', fail)
    with pytest.raises(PublishError, match='simulated failure'):
        main(_argv(runs['inception_resnet_v2_pcam'], tmp_path, f'{ORG}/x', '--dry-run'))
    assert {p.name: p.read_bytes() for p in (tmp_path / 'x').iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ['x']  # no partial folders left


def test_refuses_unreadable_onnx(runs: dict, tmp_path: Path) -> None:
    bad_onnx = tmp_path / 'broken.onnx'
    bad_onnx.write_bytes(b'not a protobuf at all' * 10)
    argv = _argv(runs['inception_v4_pcam'], tmp_path / 'out', f'{ORG}/x', '--dry-run', '--onnx', str(bad_onnx))
    _assert_refused(argv, tmp_path / 'out', 'broken.onnx: not a readable ONNX model')
    empty = tmp_path / 'notes.onnx'
    empty.write_bytes(b'')  # protobuf parses it as an empty model: it said "graph has 0 inputs and 0 outputs"
    argv[-1] = str(empty)
    _assert_refused(argv, tmp_path / 'out', r'notes.onnx: not an ONNX model \(no graph\)')


def _export(checkpoint: Path, path: Path, **metadata: Any) -> Path:
    """The checkpoint's model exported to ONNX, its weights in an external data file `<name>.data`."""
    import onnx

    from export.onnx import export_onnx

    export_onnx(load_model(None, checkpoint), path, metadata=metadata or None)
    onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, location=f'{path.name}.data')
    return path


def test_onnx_of_another_checkpoint_is_refused(runs: dict, tmp_path: Path) -> None:
    """The published model.onnx must be the published weights: it was only checked for inputs and outputs (an ONNX
    of another checkpoint of the same architecture differed by 0.12 in the logits, published side by side)."""
    v4 = runs['inception_v4_pcam']
    other = tmp_path / 'other.pth'
    model = load_model(None, v4['checkpoint'])
    with torch.no_grad():
        model.get_classifier().weight[1].add_(0.05)  # a later epoch, say
    save_checkpoint(other, model, arch='inception_v4_pcam', model_kwargs=MODEL_KWARGS['inception_v4_pcam'])
    onnx_file = _export(other, tmp_path / 'other.onnx')
    argv = _argv(v4, tmp_path / 'out', f'{ORG}/x', '--dry-run', '--onnx', str(onnx_file))
    _assert_refused(argv, tmp_path / 'out', r"other.onnx: its probabilities differ from the published weights' by")
    recorded = _export(other, tmp_path / 'recorded.onnx', checkpoint_sha256=file_sha256(other))
    argv[-1] = str(recorded)
    _assert_refused(argv, tmp_path / 'out', r'recorded.onnx: exported from another checkpoint \(sha256 ')
    from export.fp16 import convert_fp16  # the FP16 ONNX of the published checkpoint passes (it was refused)

    fp32 = _export(v4['checkpoint'], tmp_path / 'v4.onnx')
    convert_fp16(fp32, tmp_path / 'v4.fp16.onnx', np.random.default_rng(0).integers(0, 256, (8, 96, 96, 3), np.uint8))
    argv[-1] = str(tmp_path / 'v4.fp16.onnx')
    assert 'model.onnx' in main(argv)['files']


def test_onnx_with_external_data_is_published(runs: dict, tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    src = tmp_path / 'export'
    src.mkdir()
    run = runs['inception_v4_pcam']
    onnx_file = _export(run['checkpoint'], src / 'tiny.onnx', checkpoint_sha256=file_sha256(run['checkpoint']))
    result = main(_argv(run, tmp_path / 'out', f'{ORG}/x', '--dry-run', '--onnx', str(onnx_file)))
    assert {'model.onnx', 'tiny.onnx.data'} <= set(result['files'])
    loaded = onnx.load(str(Path(result['folder']) / 'model.onnx'))
    source = onnx.load(str(onnx_file))
    assert all(np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
               for a, b in zip(loaded.graph.initializer, source.graph.initializer))
    assert '`tiny.onnx.data`' in (Path(result['folder']) / 'README.md').read_text()


# -------------------------------------------------------------------------------------------------- upload


class FakeHfApi:
    """An in-memory Hub holding one branch per repo: enough for create_repo / file_exists / download / upload."""

    def __init__(self, download_dir: Path) -> None:
        self.files: dict[str, dict[str, bytes]] = {}
        self.commits: list[tuple[str, str]] = []
        self.download_dir = download_dir

    def create_repo(self, repo_id: str, *, repo_type: str = 'model', private: bool = False,
                    exist_ok: bool = False) -> Any:
        assert exist_ok and repo_type == 'model'
        self.files.setdefault(repo_id, {})
        return type('RepoUrl', (), {'repo_id': repo_id})()

    def file_exists(self, repo_id: str, filename: str, *, revision: str | None = None) -> bool:
        return filename in self.files.get(repo_id, {})

    def hf_hub_download(self, *, repo_id: str, filename: str, revision: str | None = None) -> str:
        path = self.download_dir / repo_id / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.files[repo_id][filename])
        return str(path)

    def upload_folder(self, *, repo_id: str, folder_path: str, repo_type: str, revision: str | None,
                      commit_message: str, delete_patterns: list[str]) -> Any:
        added = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob('*')
                 if p.is_file()}
        for name in list(self.files[repo_id]):  # huggingface_hub keeps files uploaded in the same commit
            if name not in added and any(fnmatch.fnmatch(name, pattern) for pattern in delete_patterns):
                del self.files[repo_id][name]
        self.files[repo_id].update(added)
        self.commits.append((repo_id, commit_message))
        return type('CommitInfo', (), {'commit_url': f'https://huggingface.co/{repo_id}/commit/{len(self.commits)}'})()


def test_republishing_same_checkpoint_makes_no_commit(runs: dict, published: dict, tmp_path: Path) -> None:
    api = FakeHfApi(tmp_path / 'downloads')
    run = runs['inception_v4_pcam']
    repo = f'{ORG}/v4'
    first = main(_argv(run, tmp_path / 'a', repo), api=api)
    assert first['uploaded'] and len(api.commits) == 1
    assert set(api.files[repo]) == set(first['files'])
    assert api.commits[0][1].startswith('Publish inception_v4_pcam (checkpoint sha256 ')

    again = main(_argv(run, tmp_path / 'b', repo), api=api)  # same checkpoint and report, rebuilt elsewhere
    assert not again['uploaded'] and len(api.commits) == 1

    api.files[repo].update({'model.onnx': b'old', 'model.onnx.data': b'old', 'pytorch_model.bin': b'pickle',
                            'NOTES.md': b'kept'})  # left by an earlier publish, or by hand
    other = published['inception_resnet_v2_pcam']  # another checkpoint to the same repo: a new commit
    third = hub.upload_folder(other['folder'], repo, commit_message='retrained', api=api)
    assert third['uploaded'] and len(api.commits) == 2
    assert set(api.files[repo]) == set(other['files']) | {'NOTES.md'}  # no stale weights beside the new ones
    remote_config = json.loads(api.files[repo]['config.json'])
    assert remote_config[hub.PROVENANCE_KEY]['checkpoint_sha256'] == other['checkpoint_sha256']


def test_upload_without_token_refuses_and_never_shows_one(published: dict, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    import huggingface_hub.constants as hf_constants

    for name in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf_constants, 'HF_TOKEN_PATH', str(tmp_path / 'no-token'))
    folder = published['inception_v4_pcam']['folder']
    with pytest.raises(PublishError, match=f'no Hugging Face token.*ready, upload it later with: hf upload {ORG}/x'):
        hub.upload_folder(folder, f'{ORG}/x', commit_message='m')

    secret = 'hf_' + 'Zq' * 17  # a token the (offline) upload attempt must not reveal anywhere
    monkeypatch.setenv('HF_TOKEN', secret)
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(PublishError, match=f'upload to {ORG}/x failed') as e:
        hub.upload_folder(folder, f'{ORG}/x', commit_message='m')
    captured = capsys.readouterr()
    assert secret not in str(e.value) and secret not in captured.out and secret not in captured.err
    assert all(secret.encode() not in p.read_bytes() for p in Path(folder).rglob('*') if p.is_file())


# ------------------------------------------------------------------------- data provenance (synthetic != PCam)

NOT_PCAM_REPORTS = {  # report variants whose numbers must never be presented as PatchCamelyon results
    'synthetic': {'data': {'provenance': 'synthetic'}},
    'synthetic-upper': {'data': {'provenance': 'Synthetic'}},
    'no-data-key': {},
    'data-null': {'data': None},
    'data-a-string': {'data': 'pcam'},  # not the recorded layout: unknown, not trusted
    'provenance-null': {'data': {'provenance': None}},
    'provenance-other': {'data': {'provenance': 'camelyon17'}},
}


def _variant(report: dict, extra: dict) -> dict:
    out = {k: v for k, v in report.items() if k != 'data'}
    out.update(extra)
    return out


def _card(report: dict, training: str = 'unknown', arch: str = 'inception_v4_pcam') -> tuple[str, Any]:
    provenance = report_provenance(report)
    text = render_card(
        repo_id=f'{ORG}/x', arch=arch, report=report, provenance=provenance, training=training,
        meta={}, train_args={}, model_args={}, data_cfg={'input_size': (3, 96, 96), 'mean': PCAM_MEAN,
                                                         'std': PCAM_STD},
        plots={'roc': 'roc.png'}, onnx_info=None, num_params=1000,
        hashes={k: 'h' for k in ('checkpoint_sha256', 'report_sha256', 'weights_sha256', 'timm_version',
                                 'package_version')},
        dataset_id=hub.DEFAULT_DATASET_ID, license_id='apache-2.0', base_model=None)
    return text, ModelCard(text)


@pytest.mark.parametrize('variant', list(NOT_PCAM_REPORTS))
def test_a_report_not_on_pcam_never_gives_a_pcam_model_index(variant: str, runs: dict) -> None:
    report = _variant(runs['inception_v4_pcam']['report_data'], NOT_PCAM_REPORTS[variant])
    assert report_provenance(report) != 'pcam'
    text, card = _card(report)
    front = text.split('\n---\n', 1)[0]
    assert card.data.eval_results is None and 'model-index' not in front
    assert not card.data.datasets and hub.DEFAULT_DATASET_ID not in text
    assert not {'patchcamelyon', 'pcam'} & set(card.data.tags)
    assert 'Results on the PCam' not in text
    body = text.split('\n---\n', 1)[1]
    heading = next(line for line in body.splitlines() if line.startswith('## Results'))
    title = next(line for line in body.splitlines() if line.startswith('# '))
    if 'synthetic' in variant:
        assert 'synthetic data (not pcam)' in heading.lower()
    else:
        assert 'unrecorded provenance' in heading and 'not a PCam result' in body
        assert '**Data of unrecorded provenance.**' in body
    if 'synthetic' in variant:  # at every number: title, summary box, heading, table caption, plot captions
        assert 'synthetic' in title and '**Synthetic data.**' in body and '**Synthetic data:** measured' in body
        assert '![ROC curve (synthetic data)](roc.png)' in body


def test_a_checkpoint_trained_on_synthetic_data_is_labelled_even_with_a_pcam_report(runs: dict) -> None:
    report = runs['inception_v4_pcam']['report_data']
    text, card = _card(report, training='synthetic')
    assert card.data.eval_results is None and 'synthetic-data' in card.data.tags
    assert 'trained on synthetic PCam-format patches' in text and 'Results on the PCam' not in text
    text, card = _card(report, training='pcam')  # the real thing: a PCam model-index on the PCam dataset
    assert [r.dataset_type for r in card.data.eval_results] == [hub.DEFAULT_DATASET_ID] * 4
    assert 'trained on PatchCamelyon (PCam)' in text


@pytest.mark.parametrize('value,expected', [
    ('pcam', 'pcam'), ('synthetic', 'synthetic'), (' PCam ', 'pcam'), ({'provenance': 'synthetic'}, 'synthetic'),
    ('{"provenance": "pcam"}', 'pcam'), (None, 'unknown'), ('', 'unknown'), (3, 'unknown'), ('{broken', 'unknown'),
    ({'kind': 'synthetic'}, 'synthetic'), ({'other': 'pcam'}, 'unknown'),
])
def test_provenance_of_reads_what_checkpoints_and_reports_record(value: Any, expected: str) -> None:
    assert provenance_of(value) == expected


def _synthetic_run(run: dict, root: Path, provenance: dict | None) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    report = _variant(run['report_data'], {} if provenance is None else {'data': provenance})
    (root / 'report.json').write_text(json.dumps(report))
    return ['--checkpoint', str(run['checkpoint']), '--report', str(root / 'report.json'), '--plots-dir',
            str(run['dir'])]


@pytest.mark.parametrize('provenance', [{'provenance': 'synthetic'}, None], ids=['synthetic', 'unrecorded'])
def test_upload_of_a_non_pcam_result_is_refused_unless_allowed(provenance: dict | None, runs: dict,
                                                               tmp_path: Path, caplog, capsys) -> None:
    api = FakeHfApi(tmp_path / 'downloads')
    base = _synthetic_run(runs['inception_v4_pcam'], tmp_path / 'eval', provenance)
    repo = f'{ORG}/synthetic'
    word = 'synthetic' if provenance else 'unknown'
    with caplog.at_level(logging.INFO), pytest.raises(PublishError, match=f'not uploading .*records {word} data'
                                                                          '.*--allow-synthetic'):
        main([*base, '--repo-id', repo, '--output', str(tmp_path / 'a')], api=api)
    assert api.commits == [] and repo not in api.files
    assert not [r for r in caplog.records if r.name.startswith('timm.')]  # nor timm's lines naming a temporary folder
    dry = main([*base, '--repo-id', repo, '--output', str(tmp_path / 'b'), '--dry-run'])  # a dry run is fine
    assert dry['data_provenance'] == word and not dry['uploaded']
    assert dry['upload_command'] is None  # an `hf upload` line would get round the refusal: none is offered
    printed = capsys.readouterr().out
    assert 'hf upload' not in printed and f'upload: refused as it is (the evaluation report records {word}' in printed
    allowed = main([*base, '--repo-id', repo, '--output', str(tmp_path / 'b2'), '--dry-run', '--allow-synthetic'])
    assert allowed['upload_command'].startswith(f'hf upload {repo} ')
    assert json.loads(Path(dry['folder'], 'config.json').read_text())[hub.PROVENANCE_KEY]['data_provenance'] == word

    done = main([*base, '--repo-id', repo, '--output', str(tmp_path / 'c'), '--allow-synthetic'], api=api)
    assert done['uploaded'] and len(api.commits) == 1 and f'on {word} data' in api.commits[0][1]
    card = ModelCard(api.files[repo]['README.md'].decode())
    assert card.data.eval_results is None and not card.data.datasets


@pytest.mark.parametrize('data,training,allowed', [
    ('pcam', 'pcam', True), ('pcam', 'unknown', True), ('pcam', 'synthetic', False), ('synthetic', 'pcam', False),
    ('unknown', 'unknown', False), ('synthetic', 'synthetic', False),
])
def test_upload_needs_a_pcam_report_and_no_synthetic_training(data: str, training: str, allowed: bool) -> None:
    if allowed:
        hub.check_upload_allowed(data, training, allow_synthetic=False, folder='f')
    else:
        with pytest.raises(PublishError, match='not uploading f: .*not PCam results.*--allow-synthetic'):
            hub.check_upload_allowed(data, training, allow_synthetic=False, folder='f')
    hub.check_upload_allowed(data, training, allow_synthetic=True, folder='f')  # the flag lets any through


def test_official_repo_never_takes_a_non_pcam_result(runs: dict, tmp_path: Path) -> None:
    base = _synthetic_run(runs['inception_v4_pcam'], tmp_path / 'eval', {'provenance': 'synthetic'})
    with pytest.raises(PublishError, match='official repo .* only takes weights evaluated on PCam .*report: synth'):
        main([*base, '--repo-id', OFFICIAL_REPOS['inception_v4_pcam'], '--output', str(tmp_path / 'o'),
              '--allow-synthetic', '--dry-run'], api=FakeHfApi(tmp_path / 'd'))
    for repo in (OFFICIAL_REPOS['vgg16_pcam'], 'Timm-Inception-PCam/inception_v4_pcam'):  # another model's repo; case
        with pytest.raises(PublishError, match=f'{repo}: the timm-inception-pcam organisation|{repo} is the official'):
            main([*base, '--repo-id', repo, '--output', str(tmp_path / 'o'), '--allow-synthetic', '--dry-run'],
                 api=FakeHfApi(tmp_path / 'd'))


def test_pcam_tag_loads_once_the_official_repo_holds_the_weights(runs: dict, published: dict,
                                                                 offline_cache: Path) -> None:
    arch = 'inception_v4_pcam'
    _hf_cache(offline_cache, OFFICIAL_REPOS[arch], Path(published[arch]['folder']))
    model = timm.create_model(f'{arch}.pcam', pretrained=True, **MODEL_KWARGS[arch])
    _same_weights(model.state_dict(), runs[arch]['model'].state_dict())


# ------------------------------------------------------------------------------- paths read from files are data


def _outside_file(tmp_path: Path) -> Path:
    outside = tmp_path / 'elsewhere' / 'roc.png'
    outside.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (4, 4), (1, 2, 3)).save(outside)
    return outside


@pytest.mark.parametrize('case', ['absolute', 'dotdot', 'symlink-out', 'hf-token', 'home-tilde', 'dotdot-token'])
def test_report_paths_outside_the_report_folder_are_refused(case: str, runs: dict, tmp_path: Path) -> None:
    run = runs['inception_v4_pcam']
    eval_dir = tmp_path / 'eval'
    shutil.copytree(run['dir'], eval_dir, ignore=shutil.ignore_patterns('*.pth'))
    outside = _outside_file(tmp_path)
    name = {
        'absolute': str(outside),
        'dotdot': '../elsewhere/roc.png',
        'symlink-out': 'roc.png',
        'hf-token': str(Path.home() / '.cache' / 'huggingface' / 'token'),
        'home-tilde': '~/.cache/huggingface/token',
        'dotdot-token': '../../../../../../../../../../root/.cache/huggingface/token',
    }[case]
    if case == 'symlink-out':
        (eval_dir / 'roc.png').unlink()
        (eval_dir / 'roc.png').symlink_to(outside)
    report = dict(run['report_data'], plots={**run['report_data']['plots'], 'roc': name})
    (eval_dir / 'report.json').write_text(json.dumps(report))
    argv = ['--checkpoint', str(run['checkpoint']), '--report', str(eval_dir / 'report.json'), '--repo-id',
            f'{ORG}/x', '--output', str(tmp_path / 'out'), '--dry-run']
    _assert_refused(argv, tmp_path / 'out', 'plots.roc .*(not a plain relative path|leads out of)')


def test_path_inside_accepts_files_and_links_within_the_folder(tmp_path: Path) -> None:
    (tmp_path / 'sub').mkdir()
    (tmp_path / 'sub' / 'a.png').write_bytes(b'x')
    (tmp_path / 'link.png').symlink_to(tmp_path / 'sub' / 'a.png')
    assert path_inside(tmp_path, 'sub/a.png', what='w', source='s') == tmp_path / 'sub' / 'a.png'
    assert path_inside(tmp_path, 'link.png', what='w', source='s') == tmp_path / 'link.png'
    for bad in ('', None, 7, '/etc/passwd', 'sub/../../x', '~/x', 'a\0b'):
        with pytest.raises(PublishError):
            path_inside(tmp_path, bad, what='w', source='s')


def test_onnx_external_data_linked_out_of_its_folder_is_refused(runs: dict, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((3, 2), dtype=np.float32), 'w')
    graph = helper.make_graph(
        [helper.make_node('MatMul', ['input', 'w'], ['logits'])], 'g',
        [helper.make_tensor_value_info('input', TensorProto.FLOAT, ['batch', 3])],
        [helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['batch', 2])], [weight])
    src = tmp_path / 'export'
    src.mkdir()
    onnx.save_model(helper.make_model(graph), str(src / 'tiny.onnx'), save_as_external_data=True,
                    location='tiny.onnx.data', size_threshold=0)
    secret = tmp_path / 'secret.data'
    (src / 'tiny.onnx.data').rename(secret)
    (src / 'tiny.onnx.data').symlink_to(secret)
    argv = _argv(runs['inception_v4_pcam'], tmp_path / 'out', f'{ORG}/x', '--dry-run', '--onnx',
                 str(src / 'tiny.onnx'))
    _assert_refused(argv, tmp_path / 'out', 'external data location .* leads out of')


# ------------------------------------------------------------------------------ user errors: exit 2, one line


@pytest.mark.parametrize('case', ['bad-repo-id', 'missing-checkpoint', 'absolute-plot', 'bad-json',
                                  'output-is-a-file'])
def test_user_errors_exit_2_with_one_line(case: str, runs: dict, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    run = runs['inception_v4_pcam']
    argv = _argv(run, tmp_path / 'out', f'{ORG}/x', '--dry-run')
    if case == 'bad-repo-id':
        argv[5] = 'no-slash'
    elif case == 'missing-checkpoint':
        argv[1] = str(tmp_path / 'missing.pth')
    elif case in ('absolute-plot', 'bad-json'):
        report = tmp_path / 'report.json'
        report.write_text('{not json' if case == 'bad-json' else
                          json.dumps(dict(run['report_data'], plots={'roc': '/etc/passwd', 'pr': 'pr.png'})))
        argv[3] = str(report)
    elif case == 'output-is-a-file':
        (tmp_path / 'out').write_text('a file')
    assert errors.cli(main, 'publish', argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('publish: error: ') and 'Traceback' not in err[0]


def test_module_command_runs_through_the_shim(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, '-m', 'timm_inception_pcam.publish', '--checkpoint',
                           str(tmp_path / 'none.pth'), '--repo-id', 'a/b', '--output', str(tmp_path), '--dry-run'],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    err = proc.stderr.strip().splitlines()
    assert err == ['python -m timm_inception_pcam.publish: error: the following arguments are required: --report '
                   '(see python -m timm_inception_pcam.publish --help)']
    assert proc.stdout == ''  # refused before any step


@pytest.mark.parametrize('arch, key', [('googlenet_pcam', 'szegedy2015going'), ('vgg16_pcam', 'simonyan2015very'),
                                       ('inception_v3_pcam', 'szegedy2016rethinking'),
                                       ('inception_resnet_v1_pcam', 'szegedy2017inception')])
def test_card_cites_the_architecture_paper(arch: str, key: str, runs: dict) -> None:
    """Every card cited the Inception-v4 paper, whatever its model."""
    text, _ = _card(runs['inception_v4_pcam']['report_data'], arch=arch)
    assert f'{{{key},' in text and 'veeling2018rotation' in text
    assert ('szegedy2017inception' in text) == (key == 'szegedy2017inception')
