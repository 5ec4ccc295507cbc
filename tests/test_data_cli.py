"""The data command as a user meets it: one line and exit 2 for every user error; provenance recorded and shown."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from timm_inception_pcam.data import PCamDataset, folder_provenance, split_paths, synthesize_pcam
from timm_inception_pcam.data import provenance as prov
from timm_inception_pcam.data.__main__ import main
from timm_inception_pcam.errors import cli

PROG = 'python -m timm_inception_pcam.data'


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    code = cli(main, PROG, argv)
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    return code, [line for line in err.splitlines() if line.strip() and '%|' not in line]  # minus progress bars


@pytest.fixture(scope='module')
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('synth')
    synthesize_pcam(root, 8, seed=1, n_valid=4, n_test=4)
    return root


@pytest.mark.parametrize('argv, expected', [
    (['synth', '--root', '{tmp}/s', '--n', '0'], '--n must be >= 1, got 0'),
    (['synth', '--root', '{tmp}/s', '--n', '8', '--n-valid', '-3'], '--n-valid must be >= 1, got -3'),
    (['info', '--root', '{tmp}/missing'], 'missing: folder not found'),
    (['decompress', '--root', '{tmp}/missing'], 'missing: folder not found'),
    (['decompress', '--root', '{tmp}'], 'no camelyonpatch_level_2_split_*.h5.gz file'),
    (['convert', '--root', '{tmp}', '--output', '{tmp}/out', '--shard-size', '0'], '--shard-size must be >= 1'),
    (['convert', '--root', '{tmp}', '--output', '{tmp}/out', '--workers', '0'], '--workers must be >= 1'),
    (['convert', '--root', '{tmp}', '--output', '{tmp}/out'], 'PCam file not found'),
    (['info', '--root', '{tmp}'], 'PCam file not found'),
])
def test_user_errors_exit_2_with_one_line(argv: list[str], expected: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    code, err = _run_cli([a.format(tmp=tmp_path) for a in argv], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f'{PROG}: error: ') and expected in err[0], err


def test_truncated_and_corrupt_files_are_one_line(synth_root: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / 'pcam'
    synthesize_pcam(root, 8, seed=1, n_valid=4, n_test=4, gzip=True)
    gz = split_paths(root, 'valid')['x'].with_name('camelyonpatch_level_2_split_valid_x.h5.gz')
    gz.write_bytes(gz.read_bytes()[:200])  # truncated download
    code, err = _run_cli(['decompress', '--root', str(root), '--no-md5'], capsys)
    assert code == 2 and len(err) == 1 and 'corrupt or truncated gzip' in err[0] and gz.name in err[0]
    y = split_paths(synth_root, 'test')['y']
    broken = tmp_path / 'broken'
    broken.mkdir()
    for path in synth_root.iterdir():
        (broken / path.name).write_bytes(path.read_bytes()[:100] if path == y else path.read_bytes())
    code, err = _run_cli(['info', '--root', str(broken)], capsys)
    assert code == 2 and len(err) == 1 and f'{y.name}: not a readable HDF5 file' in err[0]


def test_a_refused_output_path_is_one_line(synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from timm_inception_pcam.data import convert

    (tmp_path / 'a-file').write_text('not a folder')
    code, lines = _run_cli(['convert', '--root', str(synth_root), '--output', str(tmp_path / 'a-file')], capsys)
    assert code == 2 and lines == [f'{PROG}: error: --output {tmp_path / "a-file"} is an existing file; expected a '
                                   'folder (new or a previous run\'s)']

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device', str(tmp_path / 'out' / 'x.png'))

    monkeypatch.setattr(convert, 'convert_pcam', full)
    code, lines = _run_cli(['convert', '--root', str(synth_root), '--output', str(tmp_path / 'out')], capsys)
    assert code == 2 and lines[-1].endswith('x.png: No space left on device; free some space or choose another '
                                            'location')

    def bug(*args, **kwargs):  # an OSError that is no refusal of a path (here: none named) stays a traceback
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(convert, 'convert_pcam', bug)
    with pytest.raises(OSError, match='No space'):
        cli(main, PROG, ['convert', '--root', str(synth_root), '--output', str(tmp_path / 'out')])


def test_subprocess_user_error_has_no_traceback(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, '-m', 'timm_inception_pcam.data', 'info', '--root', str(tmp_path / 'x')],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr and result.stderr.strip().count('\n') == 0, result.stderr


def test_synthetic_data_is_marked_in_files_and_info(synth_root: Path) -> None:
    for split in ('train', 'valid', 'test'):
        for key in ('x', 'y'):
            with h5py.File(split_paths(synth_root, split)[key], 'r') as f:
                assert f.attrs[prov.PROVENANCE_ATTR] == prov.SYNTHETIC
        assert PCamDataset(synth_root, split).provenance == 'synthetic'
    info = (synth_root / prov.SYNTH_INFO).read_text()
    assert '"provenance": "synthetic"' in info and '"seed": 1' in info
    assert folder_provenance(synth_root) == {'provenance': 'synthetic',
                                             'splits': {'train': 'synthetic', 'valid': 'synthetic',
                                                        'test': 'synthetic'}}


def test_synthetic_gzip_survives_decompression(tmp_path: Path) -> None:
    synthesize_pcam(tmp_path, 8, seed=2, n_valid=4, n_test=4, gzip=True)
    assert PCamDataset(tmp_path, 'valid').provenance == 'synthetic'


def _unmarked_copy(src: Path, dst_dir: Path) -> Path:
    """An HDF5 file with the official name and the same arrays, without the synthetic mark."""
    dst = dst_dir / src.name
    with h5py.File(src, 'r') as f, h5py.File(dst, 'w') as g:
        for key in f:
            g[key] = f[key][...]
    return dst


def test_official_files_recognised_by_md5_and_record_voided_by_change(synth_root: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    x = _unmarked_copy(split_paths(synth_root, 'test')['x'], tmp_path)
    y = _unmarked_copy(split_paths(synth_root, 'test')['y'], tmp_path)
    assert prov.split_provenance(tmp_path, 'test') == 'unknown'
    # stand-in official table: these files' md5s (the real files are 7 GB and cannot be fetched here)
    table = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in (x, y)}
    monkeypatch.setattr(prov, 'H5_MD5', table)
    assert prov.verify_official(x, progress=False) == 'pcam'
    assert prov.split_provenance(tmp_path, 'test') == 'unknown'  # y not verified yet: both are needed
    assert prov.verify_official(y, progress=False) == 'pcam'
    assert prov.split_provenance(tmp_path, 'test') == 'pcam'
    os.utime(x, ns=(x.stat().st_atime_ns, x.stat().st_mtime_ns + 10**9))  # file touched: verification void
    assert prov.file_provenance(x) == 'unknown'
    with h5py.File(x, 'a') as f:
        f['x'][0, 0, 0, 0] = np.uint8(f['x'][0, 0, 0, 0] ^ 1)
    assert prov.verify_official(x, progress=False) == 'unknown'  # changed content: not the official file


def test_synth_refuses_to_overwrite_foreign_files(synth_root: Path, tmp_path: Path) -> None:
    _unmarked_copy(split_paths(synth_root, 'valid')['x'], tmp_path)
    with pytest.raises(FileExistsError, match='not written by synth'):
        synthesize_pcam(tmp_path, 8, seed=0, n_valid=4, n_test=4)
    synthesize_pcam(synth_root / 'again', 8, seed=1, n_valid=4, n_test=4)
    synthesize_pcam(synth_root / 'again', 8, seed=1, n_valid=4, n_test=4)  # an earlier synthetic set: replaced
    assert PCamDataset(synth_root / 'again', 'test').provenance == 'synthetic'


def test_info_prints_provenance(synth_root: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(['info', '--root', str(synth_root)]) == 0
    assert 'provenance: synthetic (written by synth: results on it are not PCam results)' in capsys.readouterr().out


def test_info_checks_the_splits_asked_for(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A folder with only the test split (`download --splits test`): info --splits test checks it (info stopped at
    the missing train split; convert and evaluate take such a folder)."""
    synthesize_pcam(tmp_path, 8, seed=3, n_valid=4, n_test=6)
    for key in ('x', 'y', 'meta'):
        for split in ('train', 'valid'):
            split_paths(tmp_path, split)[key].unlink()
    code, err = _run_cli(['info', '--root', str(tmp_path)], capsys)
    assert code == 2 and 'split_train_x.h5: PCam file not found' in err[0]
    assert main(['info', '--root', str(tmp_path), '--splits', 'test']) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith('test: 6 patches') and out[-1].startswith(f'info: {tmp_path} holds the test split in the '
                                                                      f'PCam layout; provenance: synthetic')


def test_info_reads_the_meta_csv_when_present(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    synthesize_pcam(tmp_path, 16, seed=3, n_valid=8, n_test=8)
    valid, test = split_paths(tmp_path, 'valid')['meta'], split_paths(tmp_path, 'test')['meta']
    lines = valid.read_text().splitlines()
    fields = lines[1].split(',')
    column = lines[0].split(',').index('center_tumor_patch')
    fields[column] = str(fields[column] != 'True')
    valid.write_text('\n'.join([lines[0], ','.join(fields), *lines[2:]]) + '\n')  # one centre flag disagrees
    test.unlink()
    assert main(['info', '--root', str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith('train: 16 patches') and 'center_tumor_patch = label for 16 of 16' in out[0]
    assert 'center_tumor_patch = label for 7 of 8' in out[1] and out[2].endswith('; no meta CSV')
    valid.write_text('\n'.join(lines[:-1]) + '\n')  # a row short
    code, err = _run_cli(['info', '--root', str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and err[0].endswith(f'{valid}: 7 rows; expected 8 (one per image)')
