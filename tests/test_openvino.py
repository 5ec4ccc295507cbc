"""OpenVINO runner: float32 parity with PyTorch, bf16/int8 close, conversions cached on disk, errors in one line."""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import timm_inception_pcam  # noqa: F401  (registers the models)
from timm_inception_pcam.errors import InferenceError, UsageError
from timm_inception_pcam.inference import Runner
from timm_inception_pcam.preprocess import preprocess_patches
from timm_inception_pcam.testing import blob_patches

pytest.importorskip('openvino', reason='openvino is a declared dependency; missing only in a broken environment')
from timm_inception_pcam.inference.openvino_runner import OpenVINORunner, weights_sha256  # noqa: E402


@pytest.fixture(scope='module')
def model() -> torch.nn.Module:
    from timm_inception_pcam.testing import train_tiny_model

    return train_tiny_model(*blob_patches(64, seed=0), steps=80)


@pytest.fixture(scope='module')
def patches() -> np.ndarray:
    return blob_patches(40, seed=1)[0]


@pytest.fixture(scope='module')
def reference(model: torch.nn.Module, patches: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        ref = model(torch.from_numpy(preprocess_patches(patches))).numpy()
    assert ref.std(axis=0).min() > 0.5, 'a parity check on near-constant logits would mean nothing'
    return ref


def test_fp32_matches_pytorch(model, patches, reference, tmp_path: Path) -> None:
    runner = OpenVINORunner(model, 'fp32', cache_dir=tmp_path, batch_size=16)
    assert isinstance(runner, Runner)
    assert runner.spec.backend == 'openvino_fp32' and runner.spec.precision == 'fp32'
    out = runner.logits(patches)
    assert out.dtype == np.float32 and out.shape == (40, 2)
    np.testing.assert_allclose(out, reference, rtol=1e-3, atol=1e-4 * np.abs(reference).max())


def test_bf16_and_int8_are_close_and_cached(model, patches, reference, tmp_path: Path) -> None:
    scale = np.abs(reference).max()
    bf16 = OpenVINORunner(model, 'bf16', cache_dir=tmp_path)
    err_bf16 = np.abs(bf16.logits(patches) - reference).max()
    assert 0 < err_bf16 < 0.1 * scale  # bf16 really ran (not float32) and stays close
    int8 = OpenVINORunner(model, 'int8', cache_dir=tmp_path, calibration=patches[:32],
                          calibration_info={'source': 'test patches', 'seed': 0})
    first = int8.logits(patches)
    assert int8.spec.extra['cache_hit'] is False
    assert int8.spec.extra['calibration'] == {'n': 32, 'sha256': int8.spec.extra['calibration']['sha256'],
                                              'source': 'test patches', 'seed': 0}
    assert 0 < np.abs(first - reference).max() < 0.3 * scale
    again = OpenVINORunner(model, 'int8', cache_dir=tmp_path, calibration=patches[:32])
    assert again.spec.extra['cache_hit'] is True and again.spec.extra['calibration']['n'] == 32
    np.testing.assert_array_equal(again.logits(patches), first)
    other = OpenVINORunner(model, 'int8', cache_dir=tmp_path, calibration=patches[8:40])  # other calibration
    assert other.spec.extra['cache_hit'] is False
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith('.')]) == 3  # bf16, two int8: no leftovers
    fp32 = OpenVINORunner(model, 'fp32', cache_dir=tmp_path)  # the graph bf16 converted: compiled at f32, not again
    assert fp32.spec.extra['cache_hit'] is True and fp32.spec.extra['cache'] == bf16.spec.extra['cache']
    np.testing.assert_allclose(fp32.logits(patches), reference, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize('damage', ['model.xml', 'model.bin', 'meta.json'])
def test_a_damaged_cache_entry_is_converted_again(model, patches, reference, damage: str, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    OpenVINORunner(model, 'fp32', cache_dir=tmp_path)
    (entry,) = [p for p in tmp_path.iterdir() if not p.name.startswith('.')]
    (entry / damage).write_bytes(b'garbage')
    again = OpenVINORunner(model, 'fp32', cache_dir=tmp_path)
    assert again.spec.extra['cache_hit'] is False and f'{entry} is unreadable' in caplog.text
    np.testing.assert_allclose(again.logits(patches), reference, rtol=1e-3, atol=1e-4 * np.abs(reference).max())
    assert OpenVINORunner(model, 'fp32', cache_dir=tmp_path).spec.extra['cache_hit'] is True  # mended in place


def test_signal_stack_holds_the_amx_state(model, patches, tmp_path: Path) -> None:
    """OpenVINO leaves a 20 KB alternate signal stack, too small once AMX was used: the runner widens it."""
    import ctypes
    import subprocess
    import sys

    from timm_inception_pcam.inference.openvino_runner import SIGNAL_STACK_BYTES

    if not sys.platform.startswith('linux'):
        pytest.skip('sigaltstack is checked on Linux only')

    class StackT(ctypes.Structure):
        _fields_ = [('ss_sp', ctypes.c_void_p), ('ss_flags', ctypes.c_int), ('ss_size', ctypes.c_size_t)]

    OpenVINORunner(model, 'bf16', cache_dir=tmp_path, batch_size=16).logits(patches)
    stack = StackT()
    assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack)) == 0
    assert stack.ss_flags & 2 == 0 and stack.ss_size >= SIGNAL_STACK_BYTES  # SS_DISABLE clear: a stack, and large
    for _ in range(5):  # SIGCHLDs delivered on it: the process lives
        subprocess.run([sys.executable, '-c', 'pass'], check=True)


def test_weights_hash_follows_the_weights(model) -> None:
    before = weights_sha256(model)
    changed = timm.create_model('inception_v4_pcam', depths=(1, 1, 1))
    changed.load_state_dict(model.state_dict())
    assert weights_sha256(changed) == before
    with torch.no_grad():
        changed.get_classifier().bias.add_(1e-3)
    assert weights_sha256(changed) != before


def test_cache_keeps_the_most_recently_used_within_its_limit(model, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import time

    from timm_inception_pcam.inference.openvino_runner import CACHE_GB_ENV, cache_limit_bytes, prune_cache

    first = OpenVINORunner(model, 'fp32', cache_dir=tmp_path)
    entry = Path(first.spec.extra['cache'])
    os.utime(entry / 'meta.json', (1, 1))
    OpenVINORunner(model, 'bf16', cache_dir=tmp_path)  # a hit marks the entry as used now
    assert (entry / 'meta.json').stat().st_mtime > time.time() - 60
    changed = timm.create_model('inception_v4_pcam', depths=(1, 1, 1))
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.get_classifier().bias.add_(1e-3)
    monkeypatch.setenv(CACHE_GB_ENV, '0')  # keep only the entry just made
    second = Path(OpenVINORunner(changed, 'fp32', cache_dir=tmp_path).spec.extra['cache'])
    assert second != entry and second.is_dir() and not entry.exists()

    # the order: least recently used first, never the entry just made; a killed conversion's folder after a day
    root = tmp_path / 'fake'
    now = time.time()
    for i, name in enumerate(('a', 'b', 'c')):
        (root / name).mkdir(parents=True)
        (root / name / 'model.bin').write_bytes(b'x' * 100)
        (root / name / 'meta.json').write_text('{}')
        os.utime(root / name / 'meta.json', (now - 100 + i, now - 100 + i))
    (root / '.k.old.partial').mkdir()
    os.utime(root / '.k.old.partial', (now - 2 * 86400, now - 2 * 86400))
    (root / '.k.new.partial').mkdir()
    assert prune_cache(root, root / 'a', 250) == [root / 'b']
    assert sorted(p.name for p in root.iterdir()) == ['.k.new.partial', 'a', 'c']
    assert prune_cache(root, root / 'c', 0) == [root / 'a']

    monkeypatch.setenv(CACHE_GB_ENV, '0.5')
    assert cache_limit_bytes() == 500_000_000
    for bad in ('lots', '-1', 'nan'):
        monkeypatch.setenv(CACHE_GB_ENV, bad)
        with pytest.raises(UsageError, match=f"{CACHE_GB_ENV}='{bad}': expected a size in gigabytes"):
            OpenVINORunner(model, 'fp32', cache_dir=tmp_path)


def test_errors(model, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="precision 'fp8' not supported: expected one of fp32, bf16, int8"):
        OpenVINORunner(model, 'fp8', cache_dir=tmp_path)
    with pytest.raises(UsageError, match='int8 needs calibration patches'):
        OpenVINORunner(model, 'int8', cache_dir=tmp_path)
    with pytest.raises(UsageError, match='no readable cached int8 model of these weights for calibration 0000'):
        OpenVINORunner(model, 'int8', cache_dir=tmp_path, calibration_sha256='0' * 64)
    with pytest.raises(InferenceError, match='missing.xml: OpenVINO IR not found'):
        OpenVINORunner(tmp_path / 'missing.xml')
    with pytest.raises(UsageError, match='batch_size must be >= 1'):
        OpenVINORunner(model, 'fp32', cache_dir=tmp_path, batch_size=0)


@pytest.fixture(scope='module')
def exported(model, tmp_path_factory) -> dict:
    from export.openvino import export_openvino

    out = tmp_path_factory.mktemp('ir')
    patches = blob_patches(48, seed=2)[0]
    return export_openvino(model, out, model_name='inception_v4_pcam', checkpoint=None, precision='fp32',
                           patches=patches, patch_source='test patches', stem='tiny')


def test_ir_export_round_trip_and_parity(exported, model, patches, reference) -> None:
    import json

    out = exported['xml'].parent
    assert sorted(p.name for p in out.iterdir()) == ['tiny.bin', 'tiny.xml', 'tiny.xml.json', 'tiny.xml.parity.json']
    sidecar = json.loads(exported['sidecar'].read_text())
    assert sidecar['format'] == 'timm-inception-pcam-openvino/1' and sidecar['precision'] == 'fp32'
    assert sidecar['label_names'] == ['normal', 'metastatic'] and len(sidecar['sha256']['bin']) == 64
    assert exported['parity']['passed'] and exported['parity']['outputs_vary']
    runner = OpenVINORunner(exported['xml'])
    assert runner.spec.source == str(exported['xml'])
    np.testing.assert_allclose(runner.logits(patches), reference, rtol=1e-3, atol=1e-4 * np.abs(reference).max())
    bf16 = OpenVINORunner(exported['xml'], 'bf16')  # the same IR compiled in bf16
    assert (bf16.logits(patches).argmax(1) == reference.argmax(1)).mean() >= 0.95


def test_broken_ir_files_are_named(exported, tmp_path: Path) -> None:
    import shutil

    for name in ('tiny.xml', 'tiny.bin', 'tiny.xml.json'):
        shutil.copy(exported['xml'].parent / name, tmp_path / name)
    xml, bin_ = tmp_path / 'tiny.xml', tmp_path / 'tiny.bin'
    bin_.write_bytes(bin_.read_bytes()[:-16])  # truncated weights
    with pytest.raises(InferenceError, match=r'tiny.bin: sha256 does not match tiny.xml.json'):
        OpenVINORunner(xml)
    (tmp_path / 'tiny.xml.json').unlink()  # without the sidecar, OpenVINO itself notices
    with pytest.raises(InferenceError, match=r'tiny.xml: not a readable OpenVINO IR'):
        OpenVINORunner(xml)
    xml.write_text('<net>garbage')
    with pytest.raises(InferenceError, match=r'tiny.xml: not a readable OpenVINO IR'):
        OpenVINORunner(xml)
    bin_.unlink()
    with pytest.raises(InferenceError, match=r'tiny.xml: OpenVINO IR not found; expected the .xml with its .bin'):
        OpenVINORunner(xml)


def test_export_cli_user_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from export.openvino import main
    from timm_inception_pcam.errors import cli

    cases = [
        (['--model', 'inception_v4_pcam', '--output', str(tmp_path), '--batch-size', '0'], '--batch-size must be >= 1'),
        (['--checkpoint', str(tmp_path / 'none.pth'), '--output', str(tmp_path)], 'checkpoint file not found'),
        (['--model', 'inception_v4_pcam', '--output', str(tmp_path), '--bake-preprocessing'], 'applies to ONNX'),
    ]
    for argv, expected in cases:
        assert cli(main, 'python -m export.openvino', argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0] and 'Traceback' not in err[0], err
    assert not list(tmp_path.iterdir())  # nothing written by a refused run


def test_factory_openvino_backends_keep_float32_decisions(model, patches, reference) -> None:
    from timm_inception_pcam.inference import create_runner

    for backend in ('openvino_fp32', 'openvino_bf16'):
        runner = create_runner(model, backend, batch_size=16)
        assert runner.spec.backend == backend
        assert (runner.logits(patches).argmax(1) == reference.argmax(1)).mean() >= 0.95
    for backend, stages in (('openvino_bf16_checked', ['openvino_bf16']),
                            ('openvino_cascade', ['openvino_int8', 'openvino_bf16'])):
        runner = create_runner(model, backend, batch_size=16, thresholds=(0.5, 0.3))
        out = runner.logits(patches)
        assert runner.spec.backend == backend and runner.spec.extra['stages'] == stages
        ref_p1 = np.exp(reference[:, 1]) / np.exp(reference).sum(1)
        out_p1 = np.exp(out[:, 1]) / np.exp(out).sum(1)
        for t in (0.5, 0.3):
            assert ((out_p1 >= t) == (ref_p1 >= t)).all(), (backend, t)
        stats = runner.stats()
        assert stats['patches'] == len(patches) and [s['backend'] for s in stats['stages']] == stages
    cascade = create_runner(model, 'openvino_int8', batch_size=16)
    assert cascade.spec.extra['calibration']['synthetic'] is True  # no calibration given: recorded as synthetic


def test_a_check_hashes_the_weights_once(model, monkeypatch: pytest.MonkeyPatch) -> None:
    from timm_inception_pcam.inference import create_runner, openvino_runner

    calls = []

    def counted(m: torch.nn.Module) -> str:
        calls.append(m)
        return weights_sha256(m)

    monkeypatch.setattr(openvino_runner, 'weights_sha256', counted)
    runner = create_runner(model, 'openvino_cascade', batch_size=16)
    assert len(calls) == 1  # three runners, one hash
    digests = {r.spec.extra['weights_sha256'] for r in [*runner.stages, runner.exact]}
    assert digests == {weights_sha256(model)}


def test_ir_runs_through_the_factory(exported, patches, reference) -> None:
    from timm_inception_pcam.device import cpu_has_native_bf16
    from timm_inception_pcam.errors import UsageError
    from timm_inception_pcam.inference import create_runner

    runner = create_runner(exported['xml'], 'openvino_fp32')
    np.testing.assert_allclose(runner.logits(patches), reference, rtol=1e-3, atol=1e-4 * np.abs(reference).max())
    assert create_runner(exported['xml'], precision='bf16').spec.backend == 'openvino_bf16'
    auto = create_runner(exported['xml'], thresholds=(0.5, 0.3))  # checked bf16 from the IR alone, no torch model
    assert auto.spec.backend == ('openvino_bf16_checked' if cpu_has_native_bf16() else 'openvino_fp32')
    if cpu_has_native_bf16():
        assert auto.spec.extra['checked_by'] == 'openvino_fp32' and auto.spec.source == str(exported['xml'])
        out, ref = auto.logits(patches), reference
        for t in (0.5, 0.3):
            margin = float(np.log(t / (1 - t)))
            assert ((out[:, 1] - out[:, 0] >= margin) == (ref[:, 1] - ref[:, 0] >= margin)).all(), t
    with pytest.raises(UsageError, match='does not run OpenVINO IR files'):
        create_runner(exported['xml'], 'eager')


def test_auto_runs_the_cascade_where_its_int8_is_cached_and_has_not_cost_more(
        model, patches, reference, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`auto` never quantises; once this model's int8 is cached it runs the cascade, until a cascade here finds that
    int8 costlier than it saves (recorded in the cache entry): then bf16 checked again."""
    import copy
    import json

    from timm_inception_pcam.inference import check as check_mod
    from timm_inception_pcam.inference import create_runner, factory
    from timm_inception_pcam.inference.openvino_runner import cached_int8, this_cpu

    monkeypatch.setenv('TIMM_INCEPTION_PCAM_OPENVINO_CACHE', str(tmp_path))
    monkeypatch.setattr(factory, 'cpu_has_native_bf16', lambda: True)
    assert factory.auto_backend(model) == 'openvino_bf16_checked'
    assert create_runner(model, batch_size=16).spec.backend == 'openvino_bf16_checked'
    assert not list(tmp_path.glob('*/meta.json'))[1:]  # the float graph only: auto quantised nothing

    create_runner(model, 'openvino_int8', batch_size=16).close()  # an explicit int8 run quantises and caches it
    assert factory.auto_backend(model) == 'openvino_cascade'
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    assert factory.auto_backend(other) == 'openvino_bf16_checked'  # another model's weights: not its int8

    auto = create_runner(model, batch_size=16, thresholds=(0.5,))
    assert auto.spec.backend == 'openvino_cascade' and auto.spec.extra['stages'] == ['openvino_int8', 'openvino_bf16']
    assert auto.stages[0].spec.extra['cache_hit'] is True  # its int8 from the cache, no calibration patches needed
    many = np.concatenate([patches] * 4)  # 160 patches
    assert (auto.logits(many).argmax(1) == np.tile(reference.argmax(1), 4)).all()

    # int8 made slow on a fake clock: the cascade drops it after DROP_AFTER patches and records it in the cache
    now = [0.0]
    monkeypatch.setattr(check_mod, 'perf_counter', lambda: now[0])
    monkeypatch.setattr(check_mod, 'DROP_AFTER', 32)
    cascade = create_runner(model, batch_size=16, thresholds=(0.5,))
    for k, cost in ((0, 10.0), (1, 1.0)):  # seconds per patch: int8 ten times bf16's
        stage, run = cascade.stages[k], cascade.stages[k].logits
        stage.logits = lambda x, run=run, cost=cost: (now.__setitem__(0, now[0] + cost * len(x)), run(x))[1]
    out = cascade.logits(many)
    assert (out.argmax(1) == np.tile(reference.argmax(1), 4)).all()
    assert cascade.stats()['stages'][0]['dropped_after'] == 16 + 32  # the warm-up (first batch), DROP_AFTER more
    meta = json.loads((Path(cascade.stages[0].spec.extra['cache']) / 'meta.json').read_text())
    assert meta['costly_on'][this_cpu()]['dropped_after'] == 48
    assert cached_int8(meta['weights_sha256'], tuple(meta['mean']), tuple(meta['std'])) is None
    assert factory.auto_backend(model) == 'openvino_bf16_checked'
    assert create_runner(model, batch_size=16).spec.backend == 'openvino_bf16_checked'
    assert create_runner(model, 'openvino_cascade', batch_size=16).spec.extra['stages'][0] == 'openvino_int8'


def test_auto_with_a_damaged_cached_int8_is_bf16_checked(model, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from timm_inception_pcam.inference import create_runner, factory

    monkeypatch.setenv('TIMM_INCEPTION_PCAM_OPENVINO_CACHE', str(tmp_path))
    monkeypatch.setattr(factory, 'cpu_has_native_bf16', lambda: True)
    int8 = create_runner(model, 'openvino_int8', batch_size=16)
    int8.close()
    assert factory.auto_backend(model) == 'openvino_cascade'
    (Path(int8.spec.extra['cache']) / 'model.bin').write_bytes(b'garbage')
    assert create_runner(model, batch_size=16).spec.backend == 'openvino_bf16_checked'
    assert 'is unreadable' in caplog.text and factory.auto_backend(model) == 'openvino_bf16_checked'


def test_an_int8_export_leaves_the_cascade_to_auto(model, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`export.openvino --precision int8` quantises through the cache: `auto` then runs the cascade on those
    calibration patches (the user's training split, for a real export), without quantising again."""
    from export.openvino import export_openvino
    from timm_inception_pcam.inference import create_runner, factory

    monkeypatch.setenv('TIMM_INCEPTION_PCAM_OPENVINO_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(factory, 'cpu_has_native_bf16', lambda: True)
    assert factory.auto_backend(model) == 'openvino_bf16_checked'
    calibration = blob_patches(32, seed=5)[0]
    info = {'source': 'test calibration patches', 'seed': 5, 'n': 32}
    export_openvino(model, tmp_path / 'ir', model_name='inception_v4_pcam', checkpoint=None, precision='int8',
                    patches=blob_patches(48, seed=2)[0], patch_source='test patches', calibration=calibration,
                    calibration_info=info, stem='tiny')
    assert factory.auto_backend(model) == 'openvino_cascade'
    int8 = create_runner(model, batch_size=16).stages[0]
    assert int8.spec.extra['cache_hit'] is True and int8.spec.extra['calibration']['source'] == info['source']


def test_int8_quantisation_does_not_warn_of_cuda_on_a_cpu_machine(tmp_path: Path) -> None:
    """NNCF loads torch's extension builder, which logged "No CUDA runtime is found" on a CPU machine with a CUDA
    toolkit (CUDA_HOME set) in the middle of an int8 export."""
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip('the warning is only given where no CUDA device is usable')
    code = ('import logging, numpy as np, timm, timm_inception_pcam\n'
            'from timm_inception_pcam.inference.openvino_runner import convert_to_openvino\n'
            'logging.basicConfig(level=logging.WARNING)\n'
            'm = timm.create_model("inception_v4_pcam", depths=(1, 1, 1))\n'
            'convert_to_openvino(m, "int8", np.zeros((8, 96, 96, 3), np.uint8))\n'
            'import sys\n'
            'print("converted", "torch.utils.cpp_extension" in sys.modules)\n')  # NNCF loaded it: the check counts
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'CUDA_HOME': str(tmp_path)})
    assert proc.returncode == 0 and proc.stdout.strip().endswith('converted True'), proc.stderr
    assert 'No CUDA runtime' not in proc.stderr
