"""Slide cohorts: Ray workers (local, 2 CPUs) running the single-slide loop, skip / resume / failure per slide,
deterministic shards for batch schedulers and their merge."""
import csv
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip('openslide', reason='whole-slide reading needs openslide-bin + openslide-python')

from timm_inception_pcam import cohort  # noqa: E402
from timm_inception_pcam.data.synth_slide import write_synthetic_slide  # noqa: E402
from timm_inception_pcam.errors import UsageError, cli  # noqa: E402
from timm_inception_pcam.wsi import SlideOptions  # noqa: E402
from timm_inception_pcam.wsi.cli import main as slide_main  # noqa: E402

TISSUE = np.zeros((4, 6), bool)
TISSUE[1:4, 1:5] = True
TUMOUR = np.zeros_like(TISSUE)
TUMOUR[2, 2:4] = True
COMMON = ['--thumbnail-size', '64', '-b', '8', '--backend', 'channels_last', '--no-progress']


@pytest.fixture(scope='module')
def slides(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp('slides')
    a = write_synthetic_slide(root / 'a.tif', TISSUE, TUMOUR, seed=1)['path']
    bigger = np.ones((5, 7), bool)
    b = write_synthetic_slide(root / 'b.tif', bigger, np.zeros_like(bigger), seed=2)['path']
    bad = root / 'c.tif'
    bad.write_bytes(b'II*\x00' + b'\x00' * 64)  # a TIFF header and nothing else: corrupt
    return {'a': Path(a), 'b': Path(b), 'c': bad}


def _tiny_checkpoint(path: Path, seed: int) -> Path:
    import timm

    from timm_inception_pcam.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = timm.create_model('inception_v4_pcam', num_classes=2, depths=(1, 1, 1))
    torch.nn.init.normal_(model.get_classifier().weight, std=0.5)
    return save_checkpoint(path, model, arch='inception_v4_pcam', model_kwargs={'depths': (1, 1, 1)},
                           data_provenance='synthetic')


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> Path:
    return _tiny_checkpoint(tmp_path_factory.mktemp('ckpt') / 'tiny.pth', seed=0)


@pytest.fixture(scope='module')
def other_checkpoint(tmp_path_factory) -> Path:
    return _tiny_checkpoint(tmp_path_factory.mktemp('ckpt') / 'other.pth', seed=1)


def _table(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {row['slide_id']: row for row in csv.DictReader(f)}


def _same_outputs(a: Path, b: Path) -> None:
    np.testing.assert_array_equal(np.load(a / 'probability.npy'), np.load(b / 'probability.npy'))
    assert (a / 'tiles.csv').read_text() == (b / 'tiles.csv').read_text()
    sa, sb = (json.loads((d / 'summary.json').read_text()) for d in (a, b))
    for key in ('tissue_tiles', 'max_probability', 'max_location', 'area_over_threshold_mm2', 'grid', 'backend'):
        assert sa[key] == sb[key], key


def test_ray_cohort_matches_single_slide_and_reruns_skip(slides, checkpoint, tmp_path: Path, capsys) -> None:
    pytest.importorskip('ray', reason='ray is a declared dependency (cohort extra)')
    out = tmp_path / 'cohort'
    argv = [str(slides['a'].parent / '*.tif'), '--checkpoint', str(checkpoint), '--out', str(out),
            '--workers', '2', *COMMON]
    assert cli(cohort.main, 'cohort', argv) == 2  # one slide failed: non-zero, after the others finished
    rows = _table(out / 'cohort.csv')
    assert [rows[k]['status'] for k in 'abc'] == ['done', 'done', 'failed']
    assert 'c.tif' in rows['c']['error'] and rows['a']['data_provenance'] == 'synthetic'
    assert rows['c']['data_provenance'] == 'synthetic'  # a failed row: the model's, as the others (it was empty)
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith('(model trained on synthetic data)')
    assert int(rows['b']['tissue_tiles']) > int(rows['a']['tissue_tiles']) > 0
    assert json.loads((out / 'cohort.json').read_text())['counts'] == {'done': 2, 'skipped': 0, 'failed': 1}
    for key in 'ab':  # exactly what the single-slide command writes
        single = tmp_path / f'single-{key}'
        slide_main([str(slides[key]), '--checkpoint', str(checkpoint), '--out', str(single), *COMMON])
        _same_outputs(out / key, single)
    stamp = (out / 'a' / 'summary.json').stat().st_mtime_ns
    assert cli(cohort.main, 'cohort', argv) == 2
    rows = _table(out / 'cohort.csv')
    assert [rows[k]['status'] for k in 'abc'] == ['skipped', 'skipped', 'failed']
    assert (out / 'a' / 'summary.json').stat().st_mtime_ns == stamp
    # A checkpoint that cannot load: one line from the Ray workers, not their traceback, and nothing written.
    capsys.readouterr()
    bad = [str(slides['a']), '--checkpoint', str(tmp_path / 'missing.pth'), '--out', str(tmp_path / 'bad'),
           '--workers', '1', *COMMON]
    assert cli(cohort.main, 'cohort', bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'cohort: error: {tmp_path / "missing.pth"}: checkpoint file not found'], err
    assert not (tmp_path / 'bad').exists()


class _Interrupted(Exception):
    pass


def test_interrupted_slide_resumes_to_identical_results(slides, checkpoint, tmp_path: Path) -> None:
    from contextlib import ExitStack

    from timm_inception_pcam.wsi.run import _make_runner

    cfg = cohort.CohortConfig(out=str(tmp_path / 'run'), options=SlideOptions(batch_size=4, save_every=0.0,
                                                                             thumbnail_size=64))
    job = cohort.SlideJob('b', str(slides['b']))
    with ExitStack() as stack:
        predict, info = _make_runner(stack, None, str(checkpoint), 'channels_last', 4)
        calls = []

        def dying(patches: np.ndarray) -> np.ndarray:
            if len(calls) == 3:
                raise _Interrupted('worker killed')
            calls.append(len(patches))
            return predict(patches)

        row = cohort.run_one(job, dying, info, cfg)
        assert row['status'] == 'failed' and 'worker killed' in row['error']
        done = tmp_path / 'run' / 'b'
        assert (done / 'progress.npz').is_file() and not (done / 'summary.json').exists()
        row = cohort.run_one(job, predict, info, cfg)
        summary = json.loads((tmp_path / 'run' / 'b' / 'summary.json').read_text())
        assert row['status'] == 'done' and summary['resumed_from_row'] > 0
        reference = cohort.run_one(job, predict, info, cohort.CohortConfig(out=str(tmp_path / 'ref'),
                                                                           options=cfg.options))
        assert reference['status'] == 'done'
    _same_outputs(tmp_path / 'run' / 'b', tmp_path / 'ref' / 'b')


def test_shards_partition_the_cohort_and_merge(slides, checkpoint, tmp_path: Path, capsys) -> None:
    from timm_inception_pcam.storage import file_sha256

    ids = [f'slide-{i:03d}' for i in range(200)]
    shards = [[i for i in ids if cohort.shard_of(i, 4) == k] for k in range(4)]
    assert sorted(sum(shards, [])) == ids and all(20 < len(s) < 80 for s in shards)
    assert cohort.shard_of('slide-007', 4) == cohort.shard_of('slide-007', 4)
    out = tmp_path / 'sharded'

    def shard(k: int, *extra: str) -> None:
        rc = cli(cohort.main, 'cohort', [str(slides['a']), str(slides['b']), '--checkpoint', str(checkpoint),
                                         '--out', str(out), '--executor', 'local', '--shard', f'{k}/2', *COMMON,
                                         *extra])
        assert rc == 0

    def merge(*extra: str) -> tuple[int, list[str]]:
        capsys.readouterr()
        rc = cli(cohort.main, 'cohort', ['--merge', '--out', str(out), *extra])
        return rc, capsys.readouterr().err.strip().splitlines()

    shard(0)
    # A join step with a shard missing fails (a SLURM dependency sees it), writing no table; on request it merges.
    rc, err = merge()
    assert rc == 2 and len(err) == 1 and 'shard 1 of 2 missing' in err[0] and '--allow-missing' in err[0], err
    assert not (out / 'cohort.csv').exists() and not (out / 'cohort.json').exists()
    rc, _ = merge('--allow-missing')
    assert rc == 0 and json.loads((out / 'cohort.json').read_text())['shards_missing'] == [1]
    shard(1)
    assert sorted(p.name for p in out.glob('cohort.shard-*.csv')) == ['cohort.shard-0-of-2.csv',
                                                                       'cohort.shard-1-of-2.csv']
    assert merge() == (0, [])
    merged = _table(out / 'cohort.csv')
    assert sorted(merged) == ['a', 'b'] and {r['status'] for r in merged.values()} == {'done'}
    shard_rows = {**_table(out / 'cohort.shard-0-of-2.csv'), **_table(out / 'cohort.shard-1-of-2.csv')}
    assert shard_rows == merged
    table = json.loads((out / 'cohort.json').read_text())  # the settings every shard ran with
    assert table['shards_missing'] == [] and table['settings'] == {
        'model': None, 'checkpoint': str(checkpoint), 'checkpoint_sha256': file_sha256(checkpoint),
        'backend': 'channels_last', 'use_ema': False, 'model_kwargs': {}, 'target_mpp': 0.972, 'mpp': None,
        'mpp_tolerance': 0.1, 'stride': 96, 'tissue_threshold': 0.07, 'min_tissue': 0.25, 'threshold': 0.5}
    assert json.loads((out / 'cohort.shard-1-of-2.json').read_text())['workers'] <= 1  # local: one slide at a time
    # Shards run with different settings are not joined: the one line names the setting and the shards.
    stamp = (out / 'cohort.csv').stat().st_mtime_ns
    shard(1, '--threshold', '0.3')
    rc, err = merge()
    assert rc == 2 and len(err) == 1 and 'threshold 0.5 (shard 0) vs 0.3 (shard 1)' in err[0], err
    assert (out / 'cohort.csv').stat().st_mtime_ns == stamp


def test_a_rerun_reuses_only_slides_finished_with_its_settings(slides, checkpoint, other_checkpoint,
                                                                tmp_path: Path, capsys) -> None:
    out = tmp_path / 'cohort'
    cell_mm2 = (96 * 0.972e-3) ** 2

    def run(*extra: str, ckpt: Path = checkpoint) -> dict[str, str]:
        capsys.readouterr()
        argv = [str(slides['a']), '--checkpoint', str(ckpt), '--out', str(out), '--executor', 'local', *COMMON]
        assert cli(cohort.main, 'cohort', [*argv, *extra]) == 0
        return _table(out / 'cohort.csv')['a']

    assert run()['status'] == 'done'
    prob = np.load(out / 'a' / 'probability.npy')
    assert (prob >= 0.9).sum() < (prob >= 0.5).sum()  # the threshold change below changes the area
    # Another threshold: the outputs are written again from the finished map (no tile classified again).
    row = run('--threshold', '0.9')
    summary = json.loads((out / 'a' / 'summary.json').read_text())
    assert (row['status'], row.get('settings_changed')) == ('done', 'threshold')
    assert float(row['area_over_threshold_mm2']) == pytest.approx((prob >= 0.9).sum() * cell_mm2)
    assert summary['threshold'] == 0.9 and summary['classified_this_run'] == 0
    assert '1 done (1 run again: their earlier outputs had other settings)' in capsys.readouterr().out
    assert json.loads((out / 'cohort.json').read_text())['settings']['threshold'] == 0.9
    # The same settings again: reused as they are; `seconds` is this run's time on the slide, not the summary's.
    summary['seconds'] = 1234.5
    (out / 'a' / 'summary.json').write_text(json.dumps(summary))
    stamp = (out / 'a' / 'summary.json').stat().st_mtime_ns
    row = run('--threshold', '0.9')
    assert row['status'] == 'skipped' and row['settings_changed'] == '' and float(row['seconds']) < 60
    assert (out / 'a' / 'summary.json').stat().st_mtime_ns == stamp
    # Another checkpoint: the slide is classified again, and the row holds the new model's values.
    row = run('--threshold', '0.9', ckpt=other_checkpoint)
    summary = json.loads((out / 'a' / 'summary.json').read_text())
    assert (row['status'], row.get('settings_changed')) == ('done', 'predictor')
    assert summary['classified_this_run'] == summary['tissue_tiles'] > 0
    assert float(row['max_probability']) == pytest.approx(summary['max_probability'])
    assert summary['max_probability'] != pytest.approx(float(np.nanmax(prob)))


def test_collect_slides_from_csv_and_bad_input(slides, tmp_path: Path) -> None:
    listing = slides['a'].parent / 'cohort_list.csv'
    listing.write_text('slide_id,path\npatient-1,a.tif\n,b.tif\n')
    jobs = cohort.collect_slides([str(listing)])
    assert [(j.slide_id, Path(j.path).name) for j in jobs] == [('patient-1', 'a.tif'), ('b', 'b.tif')]
    with pytest.raises(UsageError, match="slide id 'a' names two slides"):
        cohort.collect_slides([str(slides['a']), str(slides['a'])])
    with pytest.raises(UsageError, match='no slide matches this pattern'):
        cohort.collect_slides([str(tmp_path / '*.svs')])
    (tmp_path / 'bad.csv').write_text('file\nx.tif\n')
    with pytest.raises(UsageError, match='expected a header with a "path" column'):
        cohort.collect_slides([str(tmp_path / 'bad.csv')])


@pytest.mark.parametrize('extra, expected', [
    (['--shard', '2/2'], "--shard '2/2': expected K/N with 0 <= K < N"),
    (['--shard', 'x'], "--shard 'x': expected K/N with integers"),
    (['--workers', '0'], '--workers must be >= 1'),
    (['--threshold', '2'], '--threshold must be'),
    (['--workers', '100000'], '--workers must be >= 1 and <= 256'),
    (['--ray-address', 'garbage'], "--ray-address 'garbage': expected auto, local, HOST:PORT"),
    (['--ray-address', 'http://head:6379'], "--ray-address 'http://head:6379': expected"),
    (['--workers', '2'], '--workers 2 needs --executor ray'),  # local ignored it, and cohort.json said 2
    (['--ray-address', 'auto'], '--ray-address auto needs --executor ray'),
    (['--backend', 'nonsense'], "argument --backend: invalid choice: 'nonsense'"),
    (['--checkpoint', 'missing.pth'], 'missing.pth: checkpoint file not found'),  # no empty --out left behind
    (['--allow-missing'], '--allow-missing goes with --merge'),
])
def test_user_errors_exit_2_with_one_line(extra, expected, slides, tmp_path: Path, capsys) -> None:
    for good in (None, 'auto', 'local', '10.0.0.1:6379', 'ray://head:10001'):
        cohort.check_ray_address(good)
    argv = [str(slides['a']), '--out', str(tmp_path / 'o'), '--executor', 'local', *extra]
    try:
        rc = cli(cohort.main, 'cohort', argv)
    except SystemExit as e:  # argparse's own refusals (one line too)
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and 'Traceback' not in err[0], err
    assert not (tmp_path / 'o').exists()
    assert cli(cohort.main, 'cohort', ['--merge', '--out', str(tmp_path / 'empty')]) == 2
    assert 'no cohort.shard-K-of-N.json tables to merge' in capsys.readouterr().err


def test_an_unreachable_ray_address_is_one_line_before_any_work(slides, tmp_path: Path, capsys) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    for address in (f'127.0.0.1:{port}', f'ray://127.0.0.1:{port}'):
        argv = [str(slides['a']), '--out', str(tmp_path / 'o'), '--ray-address', address, *COMMON]
        assert cli(cohort.main, 'cohort', argv) == 2  # Ray itself retries a dead address for minutes
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f'no Ray cluster answers at 127.0.0.1:{port}' in err[0], err
        assert not (tmp_path / 'o').exists()
    pytest.importorskip('ray', reason='ray is a declared dependency (cohort extra)')
    cfg = cohort.CohortConfig(out=str(tmp_path / 'lib'), model='inception_v4_pcam')
    with pytest.raises(UsageError, match='no Ray cluster answers'):  # the library entry point checks too
        cohort.run_cohort([cohort.SlideJob('a', str(slides['a']))], cfg, ray_address=f'127.0.0.1:{port}',
                          progress=False)


@pytest.mark.parametrize('reply, passes', [
    (b'HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n', False),  # a web server on the port
    (None, False),  # accepts, never answers (Ray hung on such a port for minutes)
    (b'\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64', True),  # HTTP/2 SETTINGS, as gRPC sends
])
def test_a_ray_address_must_speak_grpc(reply: bytes | None, passes: bool) -> None:
    import threading

    server = socket.socket()
    server.bind(('127.0.0.1', 0))
    server.listen(1)
    port = server.getsockname()[1]
    kept: list[socket.socket] = []

    def serve() -> None:
        conn, _ = server.accept()
        kept.append(conn)
        conn.recv(64)
        if reply is not None:
            conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        if passes:
            cohort._check_ray_reachable(f'127.0.0.1:{port}', timeout=2)
        else:
            with pytest.raises(UsageError, match=f'something listens at 127.0.0.1:{port} but does not speak gRPC'):
                cohort._check_ray_reachable(f'127.0.0.1:{port}', timeout=2)
    finally:
        thread.join(5)
        for conn in kept:
            conn.close()
        server.close()


def test_shards_of_one_checkpoint_agree_whatever_their_model_argument() -> None:
    """One shard run with --model, another without, on the same checkpoint file: the merge refused them."""
    same = {0: {'model': None, 'checkpoint': '/a/m.pth', 'checkpoint_sha256': 'x', 'threshold': 0.5},
            1: {'model': 'inception_v4_pcam', 'checkpoint': '/b/m.pth', 'checkpoint_sha256': 'x', 'threshold': 0.5}}
    assert cohort._settings_conflict(same) == ''
    other = {**same, 1: {**same[1], 'checkpoint_sha256': 'y'}}
    assert cohort._settings_conflict(other).startswith('checkpoint_sha256 "x" (shard 0) vs "y" (shard 1)')
