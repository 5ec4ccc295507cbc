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


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> Path:
    import timm

    from timm_inception_pcam.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = timm.create_model('inception_v4_pcam', num_classes=2, depths=(1, 1, 1))
    torch.nn.init.normal_(model.get_classifier().weight, std=0.5)
    return save_checkpoint(tmp_path_factory.mktemp('ckpt') / 'tiny.pth', model, arch='inception_v4_pcam',
                           model_kwargs={'depths': (1, 1, 1)}, data_provenance='synthetic')


def _table(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {row['slide_id']: row for row in csv.DictReader(f)}


def _same_outputs(a: Path, b: Path) -> None:
    np.testing.assert_array_equal(np.load(a / 'probability.npy'), np.load(b / 'probability.npy'))
    assert (a / 'tiles.csv').read_text() == (b / 'tiles.csv').read_text()
    sa, sb = (json.loads((d / 'summary.json').read_text()) for d in (a, b))
    for key in ('tissue_tiles', 'max_probability', 'max_location', 'area_over_threshold_mm2', 'grid', 'backend'):
        assert sa[key] == sb[key], key


def test_ray_cohort_matches_single_slide_and_reruns_skip(slides, checkpoint, tmp_path: Path) -> None:
    pytest.importorskip('ray', reason='ray is a declared dependency (cohort extra)')
    out = tmp_path / 'cohort'
    argv = [str(slides['a'].parent / '*.tif'), '--checkpoint', str(checkpoint), '--out', str(out),
            '--workers', '2', *COMMON]
    assert cli(cohort.main, 'cohort', argv) == 2  # one slide failed: non-zero, after the others finished
    rows = _table(out / 'cohort.csv')
    assert [rows[k]['status'] for k in 'abc'] == ['done', 'done', 'failed']
    assert 'c.tif' in rows['c']['error'] and rows['a']['data_provenance'] == 'synthetic'
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


def test_shards_partition_the_cohort_and_merge(slides, checkpoint, tmp_path: Path) -> None:
    ids = [f'slide-{i:03d}' for i in range(200)]
    shards = [[i for i in ids if cohort.shard_of(i, 4) == k] for k in range(4)]
    assert sorted(sum(shards, [])) == ids and all(20 < len(s) < 80 for s in shards)
    assert cohort.shard_of('slide-007', 4) == cohort.shard_of('slide-007', 4)
    out = tmp_path / 'sharded'
    for k in range(2):
        rc = cli(cohort.main, 'cohort', [str(slides['a']), str(slides['b']), '--checkpoint', str(checkpoint),
                                         '--out', str(out), '--executor', 'local', '--shard', f'{k}/2', *COMMON])
        assert rc == 0
    assert sorted(p.name for p in out.glob('cohort.shard-*.csv')) == ['cohort.shard-0-of-2.csv',
                                                                       'cohort.shard-1-of-2.csv']
    assert cli(cohort.main, 'cohort', ['--merge', '--out', str(out)]) == 0
    merged = _table(out / 'cohort.csv')
    assert sorted(merged) == ['a', 'b'] and {r['status'] for r in merged.values()} == {'done'}
    shard_rows = {**_table(out / 'cohort.shard-0-of-2.csv'), **_table(out / 'cohort.shard-1-of-2.csv')}
    assert shard_rows == merged


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
])
def test_user_errors_exit_2_with_one_line(extra, expected, slides, tmp_path: Path, capsys) -> None:
    for good in (None, 'auto', 'local', '10.0.0.1:6379', 'ray://head:10001'):
        cohort.check_ray_address(good)
    argv = [str(slides['a']), '--out', str(tmp_path / 'o'), '--executor', 'local', *extra]
    assert cli(cohort.main, 'cohort', argv) == 2
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
