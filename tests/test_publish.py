"""Publishing to the Hugging Face Hub (dry run, refusals, no duplicate commit) and loading back offline with timm."""
import fnmatch
import hashlib
import json
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

import timm_inception_pcam.publish as publish
from timm_inception_pcam.checkpoint import read_checkpoint, save_checkpoint
from timm_inception_pcam.constants import LABEL_NAMES, PCAM_MEAN, PCAM_STD
from timm_inception_pcam.publish import OFFICIAL_REPOS, PublishError, main
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
    ckpt = save_checkpoint(root / 'model_best.pth', model, arch=arch, model_kwargs=MODEL_KWARGS[arch], epoch=7,
                           metrics={'val_roc_auc': 0.9}, weights='model', selection='val_roc_auc')
    if arch == 'inception_v4_pcam':  # the trainer's last.pth beside model_best.pth records the recipe
        save_checkpoint(root / 'last.pth', model, arch=arch, model_kwargs=MODEL_KWARGS[arch], epoch=9,
                        train_args={'lr': 0.01, 'epochs': 30, 'opt': 'adamw', 'data_dir': '/private/pcam'})
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
    provenance = config[publish.PROVENANCE_KEY]
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
    assert card.data.license == 'apache-2.0' and card.data.datasets == [publish.DEFAULT_DATASET_ID]
    assert {'timm', 'pathology', 'patchcamelyon'} <= set(card.data.tags)
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {'accuracy', 'roc_auc', 'f1', 'balanced_accuracy'}
    for key, result in results.items():
        assert result.metric_value == pytest.approx(report['metrics'][key], abs=1e-6)
        assert result.dataset_split == 'test' and result.task_type == 'image-classification'
    for needle in (f'hf-hub:{ORG}/{arch}-tiny', 'onnxruntime', 'trtexec', 'Not a medical device', '](roc.png)',
                   '](pr.png)', f'{report["metrics"]["roc_auc"]:.4f}', 'Checkpoint epoch: 7', '"depths": [1, 1, 1]'):
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


@pytest.mark.parametrize('arch', list(MODEL_KWARGS))
def test_pcam_tag_refuses_until_published(arch: str) -> None:
    with pytest.raises(RuntimeError) as e:
        timm.create_model(f'{arch}.pcam', pretrained=True)
    message = str(e.value)
    assert OFFICIAL_REPOS[arch] in message and f'{arch}.tf_in1k' in message and 'train' in message
    assert OFFICIAL_REPOS[arch] in publish.unpublished_weights_message(arch)


# ------------------------------------------------------------------------------------------------- refusals


def _assert_refused(argv: list[str], output: Path, match: str) -> None:
    with pytest.raises(PublishError, match=match):
        main(argv)
    assert not output.exists() or not any(output.iterdir()), 'a refused publish must write nothing'


def test_refuses_without_report(runs: dict, tmp_path: Path) -> None:
    run = runs['inception_v4_pcam']
    argv = ['--checkpoint', str(run['checkpoint']), '--repo-id', f'{ORG}/x', '--output', str(tmp_path / 'out')]
    _assert_refused(argv + ['--dry-run'], tmp_path / 'out', 'no evaluation report')
    _assert_refused(argv + ['--report', str(tmp_path / 'missing.json'), '--dry-run'], tmp_path / 'out',
                    'missing.json: evaluation report not found')


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
            str(tmp_path), '--dry-run']
    monkeypatch.setattr(sys, 'argv', ['publish', *argv])
    assert publish._cli() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('publish: error: no evaluation report')


# ------------------------------------------------------------------------------------- atomicity and ONNX


def test_failed_rebuild_keeps_previous_folder(runs: dict, published: dict, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(published['inception_v4_pcam']['folder'], tmp_path / 'x')  # an earlier publish folder
    before = {p.name: p.read_bytes() for p in (tmp_path / 'x').iterdir()}

    def fail(folder: Path, *args: Any) -> None:  # the last step, after every file of the new folder is written
        assert {'model.safetensors', 'README.md', 'config.json'} <= {p.name for p in folder.iterdir()}
        raise PublishError('simulated failure')

    monkeypatch.setattr(publish, '_verify_loads_back', fail)
    with pytest.raises(PublishError, match='simulated failure'):
        main(_argv(runs['inception_resnet_v2_pcam'], tmp_path, f'{ORG}/x', '--dry-run'))
    assert {p.name: p.read_bytes() for p in (tmp_path / 'x').iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ['x']  # no partial folders left


def test_refuses_unreadable_onnx(runs: dict, tmp_path: Path) -> None:
    bad_onnx = tmp_path / 'broken.onnx'
    bad_onnx.write_bytes(b'not a protobuf at all' * 10)
    argv = _argv(runs['inception_v4_pcam'], tmp_path / 'out', f'{ORG}/x', '--dry-run', '--onnx', str(bad_onnx))
    _assert_refused(argv, tmp_path / 'out', 'broken.onnx: not a readable ONNX model')


def test_onnx_with_external_data_is_published(runs: dict, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), 'w')
    graph = helper.make_graph(
        [helper.make_node('MatMul', ['input', 'w'], ['logits'])], 'g',
        [helper.make_tensor_value_info('input', TensorProto.FLOAT, ['batch', 3])],
        [helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['batch', 2])], [weight])
    src = tmp_path / 'export'
    src.mkdir()
    onnx.save_model(helper.make_model(graph), str(src / 'tiny.onnx'), save_as_external_data=True,
                    location='tiny.onnx.data', size_threshold=0)
    result = main(_argv(runs['inception_v4_pcam'], tmp_path / 'out', f'{ORG}/x', '--dry-run', '--onnx',
                        str(src / 'tiny.onnx')))
    assert {'model.onnx', 'tiny.onnx.data'} <= set(result['files'])
    loaded = onnx.load(str(Path(result['folder']) / 'model.onnx'))
    assert np.array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), numpy_helper.to_array(weight))
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
    third = publish.upload_folder(other['folder'], repo, commit_message='retrained', api=api)
    assert third['uploaded'] and len(api.commits) == 2
    assert set(api.files[repo]) == set(other['files']) | {'NOTES.md'}  # no stale weights beside the new ones
    remote_config = json.loads(api.files[repo]['config.json'])
    assert remote_config[publish.PROVENANCE_KEY]['checkpoint_sha256'] == other['checkpoint_sha256']


def test_upload_without_token_refuses_and_never_shows_one(published: dict, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    import huggingface_hub.constants as hf_constants

    for name in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf_constants, 'HF_TOKEN_PATH', str(tmp_path / 'no-token'))
    folder = published['inception_v4_pcam']['folder']
    with pytest.raises(PublishError, match=f'no Hugging Face token.*ready, upload it later with: hf upload {ORG}/x'):
        publish.upload_folder(folder, f'{ORG}/x', commit_message='m')

    secret = 'hf_' + 'Zq' * 17  # a token the (offline) upload attempt must not reveal anywhere
    monkeypatch.setenv('HF_TOKEN', secret)
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(PublishError, match=f'upload to {ORG}/x failed') as e:
        publish.upload_folder(folder, f'{ORG}/x', commit_message='m')
    captured = capsys.readouterr()
    assert secret not in str(e.value) and secret not in captured.out and secret not in captured.err
    assert all(secret.encode() not in p.read_bytes() for p in Path(folder).rglob('*') if p.is_file())
