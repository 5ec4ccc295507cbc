"""Bad input beyond test_data_reader: each case names the file, what was found and what was expected."""
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from timm_inception_pcam.data import PCamDataset, PCamFormatError, split_paths, synthesize_pcam


@pytest.fixture(scope='module')
def origin(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('origin')
    synthesize_pcam(root, 8, seed=1, n_valid=6, n_test=6)
    return root


@pytest.fixture
def root(origin: Path, tmp_path: Path) -> Path:
    dst = tmp_path / 'pcam'
    shutil.copytree(origin, dst)
    return dst


def _rewrite(path: Path, key: str, value: np.ndarray) -> None:
    with h5py.File(path, 'w') as f:
        f[key] = value


def test_wrong_image_dtype(root: Path) -> None:
    x = split_paths(root, 'test')['x']
    _rewrite(x, 'x', np.zeros((6, 96, 96, 3), np.float32))
    with pytest.raises(PCamFormatError, match=rf'{x.name}.*dtype float32; expected \(N, 96, 96, 3\) uint8'):
        PCamDataset(root, 'test')


def test_wrong_label_shape_and_values(root: Path) -> None:
    y = split_paths(root, 'test')['y']
    _rewrite(y, 'y', np.zeros((6, 2), np.uint8))
    with pytest.raises(PCamFormatError, match=rf'{y.name}: labels have shape \(6, 2\); expected \(N, 1, 1, 1\)'):
        PCamDataset(root, 'test')
    _rewrite(y, 'y', np.full((6, 1, 1, 1), 3, np.uint8))
    with pytest.raises(PCamFormatError, match=rf'{y.name}: labels \[3\]; expected 0 or 1'):
        PCamDataset(root, 'test')


def test_truncated_label_file(root: Path) -> None:
    y = split_paths(root, 'test')['y']
    y.write_bytes(y.read_bytes()[:100])
    with pytest.raises(PCamFormatError, match=rf'{y.name}: not a readable HDF5 file'):
        PCamDataset(root, 'test')


def test_meta_problems(root: Path) -> None:
    meta = split_paths(root, 'test')['meta']
    assert len(PCamDataset(root, 'test').labels) == 6  # without with_meta the CSV is not needed
    lines = meta.read_text().splitlines()
    meta.write_text('\n'.join(lines[:-1]) + '\n')
    with pytest.raises(PCamFormatError, match=rf'{meta.name}: 5 rows; expected 6'):
        PCamDataset(root, 'test', with_meta=True)
    meta.write_text('\n'.join([lines[0].replace('wsi', 'slide')] + lines[1:]) + '\n')
    with pytest.raises(PCamFormatError, match=r"missing \['wsi'\]"):
        PCamDataset(root, 'test', with_meta=True)
    meta.write_text('\n'.join([lines[0], lines[1].replace('True', 'yes').replace('False', 'no')] + lines[2:]) + '\n')
    with pytest.raises(PCamFormatError, match=rf"{meta.name}: unreadable row .*flag '(yes|no)'"):
        PCamDataset(root, 'test', with_meta=True)
    meta.unlink()
    with pytest.raises(FileNotFoundError, match=meta.name):
        PCamDataset(root, 'test', with_meta=True)


def test_missing_label_file_names_it(root: Path) -> None:
    y = split_paths(root, 'valid')['y']
    y.unlink()
    with pytest.raises(FileNotFoundError, match=rf'{y.name}: PCam file not found'):
        PCamDataset(root, 'val')


def test_an_empty_split_is_refused(root: Path) -> None:
    """N = 0 passed the reader and `data info` ('complete'), then the evaluator failed with a traceback."""
    paths = split_paths(root, 'test')
    _rewrite(paths['x'], 'x', np.zeros((0, 96, 96, 3), np.uint8))
    _rewrite(paths['y'], 'y', np.zeros((0, 1, 1, 1), np.uint8))
    with pytest.raises(PCamFormatError, match=rf'{paths["x"].name}: holds no images \(shape \(0, 96, 96, 3\)\); '
                                              r'expected \(N, 96, 96, 3\) with N >= 1'):
        PCamDataset(root, 'test')


def test_a_gz_that_is_already_decompressed_says_rename(root: Path) -> None:
    x = split_paths(root, 'test')['x']
    gz = x.with_name(x.name + '.gz')
    x.rename(gz)  # what a browser that decompresses on download leaves
    with pytest.raises(PCamFormatError, match=rf'{gz.name}: an uncompressed HDF5 file named .gz .*rename it to '
                                              rf'{x.name}$'):
        PCamDataset(root, 'test')
    assert not x.exists()


def test_a_folder_where_a_file_goes_is_named(root: Path) -> None:
    x = split_paths(root, 'test')['x']
    x.unlink()
    x.mkdir()
    with pytest.raises(FileNotFoundError, match=rf'{x.name}: a folder, expected the PCam HDF5 file of that name'):
        PCamDataset(root, 'test')
