"""Smoke test of the benchmark runner at tiny sizes: structure of results.json / results.md and the derived ratios.

No timing assertion: only that every figure is there, is consistent with the others and that failures are recorded.
"""
import dataclasses
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import benchmarks
from benchmarks import backends, evaluator, models, run, training
from benchmarks.common import QUICK, interleaved_times, summarize
from timm_inception_pcam.inference.factory import resolve_backend

TINY = dataclasses.replace(QUICK, batch=4, repeats=1, warmup=1, latency_repeats=1, n_fit=32, fit_epochs=2, n_eval=12,
                           train_batch=4, train_steps=1)
TINY_MODELS = tuple(m for m in models.MODELS if m[0] in ('inception_v4_pcam', models.BASELINE))


def _patch(mp: pytest.MonkeyPatch) -> None:
    """Tiny sizes, two models, and a stand-in for the data engineer's reader benchmark."""
    mp.setattr(run, 'QUICK', TINY)
    mp.setattr(models, 'MODELS', TINY_MODELS)
    fake = types.ModuleType('benchmarks.bench_data')
    fake.run = lambda quick: {'quick': quick, 'our_reader_patches_per_s': 1234.5,
                              'markdown': '| reader | patches/s |\n| --- | --- |\n| ours | 1234.5 |'}
    mp.setitem(sys.modules, 'benchmarks.bench_data', fake)
    mp.setattr(benchmarks, 'bench_data', fake, raising=False)


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch):
    _patch(monkeypatch)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    mp = pytest.MonkeyPatch()
    _patch(mp)
    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp('bench')
    try:
        results = run.main(['--output', str(out), '--quick', '--threads', '1', '--no-progress'])
    finally:
        mp.undo()
        torch.set_num_threads(before)
    return results, out


def test_results_files_and_machine(quick_run) -> None:
    results, out = quick_run
    on_disk = json.loads((out / 'results.json').read_text())
    assert on_disk['format'] == run.RESULTS_FORMAT and on_disk['quick'] is True
    assert list(on_disk['sections']) == list(run.DEFAULT_SECTIONS) and results['failed'] == []
    assert on_disk['data_provenance'] == 'synthetic'
    machine = on_disk['machine']
    assert machine['cores'] >= 1 and machine['torch'] == torch.__version__ and machine['cpu']
    assert not [p.name for p in out.iterdir() if '.partial' in p.name], 'temporary files left behind'
    md = (out / 'results.md').read_text()
    assert machine['cpu'] in md and f'torch {torch.__version__}' in md
    for name in run.DEFAULT_SECTIONS:
        assert f'## {run.TITLES[name]}' in md
    assert 'not PCam results' in md
    assert '| ours | 1234.5 |' in md  # the data benchmark's own table is carried over


def test_models_section_ratios(quick_run) -> None:
    rows = {r['label']: r for r in quick_run[0]['sections']['models']['models']}
    assert set(rows) == {label for label, _, _ in TINY_MODELS}
    base = rows[models.BASELINE]
    assert base['throughput_vs_resnet50'] == pytest.approx(1.0)
    for r in rows.values():
        assert r['params'] > 0 and r['gmacs'] > 0 and r['batch1_latency_ms'] > 0
        assert r['throughput_vs_resnet50'] == pytest.approx(r['throughput_per_s'] / base['throughput_per_s'])
        assert r['achieved_gflops'] == pytest.approx(2 * r['gmacs'] * r['throughput_per_s'])
    assert rows['inception_v4_pcam']['depths'] == [1, 1, 1]


def test_backends_section(quick_run) -> None:
    section = quick_run[0]['sections']['backends']
    (m,) = section['models']
    assert m['logit_std_across_inputs'] > 1e-3, 'agreement on a model with constant outputs would mean nothing'
    rows = m['backends']
    assert set(rows) >= {'eager', 'channels_last', 'bf16', 'bf16_checked', 'onnxruntime', 'onnxruntime_int8'}
    assert any(k.startswith('compile') and rows[k]['status'] == 'skipped' for k in rows)
    eager = rows['eager']
    assert eager['status'] == 'ok' and eager['speedup_vs_eager'] == pytest.approx(1.0)
    assert eager['accuracy']['decision_agreement'] == 1.0 and eager['accuracy']['n'] == TINY.n_eval
    for name, r in rows.items():
        if r['status'] != 'ok':
            assert r['reason']
            continue
        assert r['speedup_vs_eager'] == pytest.approx(r['eager_seconds_same_batches'] / r['seconds'])
        assert r['patches_per_s'] == pytest.approx(r['timed_batches'] * section['batch'] / r['seconds'])
        assert r['timed_batches'] == r['timing']['repeats'] <= eager['timing']['repeats']
        acc = r['accuracy']
        assert 0 <= acc['decision_agreement'] <= 1 and acc['n'] > 0, name
        assert acc['disagreements'] == round((1 - acc['decision_agreement']) * acc['n'])
    assert m['auto'] in rows and (m['auto_speedup_vs_eager'] == pytest.approx(rows[m['auto']]['speedup_vs_eager']))
    assert "main job's recipe" in m['model_source']
    checked = rows['bf16_checked']
    if checked['status'] == 'ok':  # AMX CPUs: decisions settled in float32 wherever bf16 could have flipped them
        assert checked['accuracy']['decision_agreement'] == 1.0
        c = checked['check']
        assert c['patches'] == TINY.n_eval + TINY.batch and TINY.batch <= c['rechecked'] <= c['patches']  # + warm-up
        assert c['error_range'][0] <= c['error_range'][1]
        assert 'bf16_checked re-ran' in (quick_run[1] / 'results.md').read_text()
    for backend in ('openvino_bf16_checked', 'openvino_cascade'):  # every decision float32's, stage by stage
        r = rows[backend]
        if r['status'] == 'ok':
            assert r['accuracy']['decision_agreement'] == 1.0, backend
            stages = r['check']['stages']
            assert stages[-1]['passed_on'] == r['check']['rechecked'] <= stages[-1]['seen']
            assert all(st['passed_on'] <= st['seen'] <= r['check']['patches'] for st in stages)
    assert m['target']['applies'] is False  # quick mode: not the figure the target is about
    floor = m['input_noise_floor']
    assert floor['n'] == min(TINY.n_eval, TINY.batch * backends.NOISE_BATCHES) and floor['max_abs_logit_diff'] > 0
    assert 'Noise floor: eager float32' in (quick_run[1] / 'results.md').read_text()


def test_evaluator_section(quick_run) -> None:
    """The evaluator end to end on eager and auto: float32's threshold and counts either way, timed."""
    section = quick_run[0]['sections']['evaluator']
    (m,) = section['models']
    eager, auto = m['runs']['eager'], m['runs']['auto']
    # never the cascade, though the backends section left this model's int8 in the cache (see evaluate._backend)
    assert eager['backend'] == 'eager' and auto['backend'] == resolve_backend('auto')
    assert eager['n_test'] == auto['n_test'] == section['n_test'] and eager['n_valid'] == section['n_valid']
    assert m['same_threshold_and_confusion'] and m['threshold_abs_diff'] <= evaluator.THRESHOLD_ATOL
    assert auto['confusion'] == eager['confusion'] and sum(eager['confusion'].values()) == section['n_test']
    assert m['speedup'] == pytest.approx(eager['seconds'] / auto['seconds'])
    assert m['target']['applies'] is False  # quick mode: not the figure the target is about
    assert 'The evaluator end to end' in (quick_run[1] / 'results.md').read_text()


def test_training_and_gpu_sections(quick_run) -> None:
    sections = quick_run[0]['sections']
    t = sections['training']
    times = t['times_s']
    assert set(times) == set(training.LOOPS) and all(len(v) == TINY.train_steps for v in times.values())
    ratios = sorted(a / b for a, b in zip(times['trainer'], times['bare_recipe']))
    assert t['overhead'] == pytest.approx(ratios[len(ratios) // 2] - 1 if len(ratios) % 2 else
                                          (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2 - 1)
    assert t['target_met'] == (max(t['overhead'], t['overhead_plain']) < training.OVERHEAD_TARGET)
    assert t['loops']['trainer']['median_s'] > 0 and 'Trainer overhead over a bare loop' in (
        quick_run[1] / 'results.md').read_text()
    assert sections['gpu']['status'] in ('skipped', 'ok')
    if sections['gpu']['status'] == 'skipped':
        assert sections['gpu']['reason']
    assert sections['data']['quick'] is True
    slide = sections['slide']
    assert slide['tissue_tiles'] > 0 and slide['runs'][0]['model'] is None
    assert all(r['tiles_per_second'] > 0 for r in slide['runs']) and len(slide['runs']) > 1
    for name, ratio in slide['auto_vs_baseline'].items():
        speed = {r['asked']: r['tiles_per_second'] for r in slide['runs'] if r['model'] == name}
        assert ratio == pytest.approx(speed['auto'] / speed['bf16_checked'])
    assert 'x `bf16_checked` in tiles/s' in (quick_run[1] / 'results.md').read_text()


def test_failing_section_is_recorded(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args, **_kwargs):
        raise RuntimeError('out of patience')

    monkeypatch.setattr(training, 'run', broken)
    code = run.cli(['--output', str(tmp_path), '--quick', '--sections', 'training', 'gpu', '--threads', '1',
                    '--no-progress'])
    assert code == 1
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['sections']['training'] == {'status': 'error', 'error': 'RuntimeError: out of patience'}
    assert 'gpu' in results['sections']
    assert 'Failed: `RuntimeError: out of patience`' in (tmp_path / 'results.md').read_text()


@pytest.mark.parametrize('extra, expected', [
    (['--threads', '0'], '--threads must be >= 1, got 0'),
    (['--checkpoint', '{tmp}/missing.pth'], 'missing.pth: checkpoint file not found'),
    (['--checkpoint', '{tmp}'], 'a folder, expected a checkpoint file'),
    (['--data-dir', '{tmp}/nodata'], 'nodata'),
    (['--output', '{tmp}/afile'], 'afile is an existing file; expected a folder'),
])
def test_user_errors_are_one_line_before_any_section(extra, expected, tmp_path: Path, capsys) -> None:
    (tmp_path / 'afile').write_text('not a folder')
    argv = ['--output', str(tmp_path / 'out'), '--quick', '--sections', 'gpu', '--no-progress',
            *[a.format(tmp=tmp_path) for a in extra]]
    assert run.cli(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('benchmarks.run: error: ') and expected in lines[0], lines
    assert '[bench]' not in captured.out and not (tmp_path / 'out').exists()


def test_accuracy_cost_counts_flips() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 3, (200, 2)).astype(np.float32)
    labels = (reference[:, 1] > reference[:, 0]).astype(np.int64)
    labels[:20] = 1 - labels[:20]  # an imperfect classifier: AUC below 1
    candidate = reference.copy()
    flip = np.flatnonzero(np.abs(reference[:, 1] - reference[:, 0]) > 1)[:3]
    candidate[flip] = candidate[flip][:, ::-1]
    cost = backends.accuracy_cost(reference, candidate, labels)
    assert cost['disagreements'] == 3 and cost['decision_agreement'] == pytest.approx(197 / 200)
    assert cost['roc_auc_change'] == pytest.approx(cost['roc_auc'] - cost['roc_auc_fp32'])
    assert cost['roc_auc_change'] != 0 and cost['max_abs_prob_diff'] > 0.2
    same = backends.accuracy_cost(reference, reference, labels)
    assert same['decision_agreement'] == 1.0 and same['roc_auc_change'] == 0.0


def test_interleaved_times_round_robin() -> None:
    calls: list[str] = []
    times = interleaved_times({'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')}, repeats=3, warmup=1)
    assert calls == ['a', 'b'] * 4 and [len(v) for v in times.values()] == [3, 3]
    s = summarize([3.0, 1.0, 2.0], items=64)
    assert s['median_s'] == 2.0 and s['items_per_s'] == 32.0 and (s['min_s'], s['max_s']) == (1.0, 3.0)


def test_trained_model_is_cached_and_reused(tmp_path: Path) -> None:
    from benchmarks.common import trained_model

    cache = tmp_path / 'cache'
    first, source = trained_model('inception_v4_pcam', TINY, tmp_path / 'work', cache, progress=False)
    assert "main job's recipe" in source and 'best validation ROC AUC' in source
    (cached,) = cache.iterdir()
    assert cached.name.startswith('inception_v4_pcam-1x1x1-demo-n32-e2')
    again, source = trained_model('inception_v4_pcam', TINY, tmp_path / 'other', cache, progress=False)
    assert f'reused from {cached}' in source and not (tmp_path / 'other').exists()  # no second training
    for (k, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_family_section_trains_and_compares_every_member(tmp_path: Path) -> None:
    """The family comparison end to end at reduced sizes: every model trained, evaluated and measured."""
    from benchmarks import family

    results = run.main(['--output', str(tmp_path), '--quick', '--sections', 'family', '--threads', '1',
                        '--no-progress'])
    section = results['sections']['family']
    assert section['data_provenance'] == 'synthetic'
    assert [m['model'] for m in section['models']] == [name for name, _ in family.FAMILY]
    for m in section['models']:
        assert m['params'] > 1e6 and m['gmacs'] > 0.1 and m['grids'][-1] == 3, m['model']  # no collapsed grid
        assert 0.0 <= m['test']['roc_auc'] <= 1.0 and m['n_test'] == 32 and m['train_seconds'] > 0
        assert m['eager_patches_per_s'] > 0 and m['auto_patches_per_s'] > 0
    md = (tmp_path / 'results.md').read_text()
    assert 'not how it does on PCam' in md and '| googlenet_pcam |' in md
