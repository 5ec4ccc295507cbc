"""The PCam reader and transforms: official layout, workers under spawn, batched reads, bad input."""
import gzip
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from timm_inception_pcam.data import (
    PCamDataset,
    PCamFormatError,
    create_pcam_transform,
    dihedral,
    split_paths,
    synthesize_pcam,
)


@pytest.fixture(scope='module')
def pcam_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('pcam')
    synthesize_pcam(root, n=64, seed=3, n_valid=32, n_test=32)
    return root


def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / 'copy'
    shutil.copytree(root, dst)
    return dst


def test_reads_official_layout(pcam_root: Path) -> None:
    ds = PCamDataset(pcam_root, 'validation', with_meta=True)
    assert ds.split == 'valid' and len(ds) == 32
    image, label, meta = ds[7]
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    assert label == ds.labels[7] and meta['center_tumor_patch'] == bool(label)
    with h5py.File(split_paths(pcam_root, 'valid')['x'], 'r') as f:
        np.testing.assert_array_equal(image, f['x'][7])


def test_batched_read_matches_single_reads_in_any_order(pcam_root: Path) -> None:
    ds = PCamDataset(pcam_root, 'train')
    idx = [9, 3, 4, 5, 30, 0, 5, -1]
    images, labels = ds.read_batch(idx)
    for row, i in enumerate(idx):
        np.testing.assert_array_equal(images[row], ds[i % len(ds)][0])
        assert labels[row] == ds.labels[i]
    mem = PCamDataset(pcam_root, 'train', in_memory=True)
    np.testing.assert_array_equal(mem.read_batch(idx)[0], images)
    with pytest.raises(IndexError, match='out of range'):
        ds.read_batch([len(ds)])


def _read_all(loader: torch.utils.data.DataLoader) -> np.ndarray:
    return np.concatenate([batch[1].numpy() for batch in loader])


@pytest.mark.parametrize('context', ['fork', 'spawn'])
def test_dataloader_workers(pcam_root: Path, context: str) -> None:
    ds = PCamDataset(pcam_root, 'test', transform=create_pcam_transform(False))
    ds[0]  # an open handle in the parent must not leak into workers
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, multiprocessing_context=context)
    np.testing.assert_array_equal(_read_all(loader), ds.labels)
    assert pickle.loads(pickle.dumps(ds))._file is None


def test_transforms_keep_label_region_and_vary(pcam_root: Path) -> None:
    ds = PCamDataset(pcam_root, 'train')
    image = ds[0][0]
    train_tf, eval_tf = create_pcam_transform(True), create_pcam_transform(False)
    ref = eval_tf(image)
    expected = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - torch.tensor((0.7008, 0.5384, 0.6916))
                [:, None, None]) / torch.tensor((0.2350, 0.2774, 0.2129))[:, None, None]
    torch.testing.assert_close(ref, expected)
    views = torch.stack([train_tf(image) for _ in range(8)])
    assert views.shape == (8, 3, 96, 96) and views.std(0).mean() > 0.01
    with pytest.raises(ValueError, match='label region'):
        create_pcam_transform(True, max_shift=16)


def test_dihedral_group() -> None:
    x = torch.arange(16.).reshape(1, 4, 4)
    views = [dihedral(x, k) for k in range(8)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    torch.testing.assert_close(dihedral(dihedral(x, 1), 3), x)
    with pytest.raises(ValueError):
        dihedral(x, 8)


def test_gz_files_as_distributed_are_decompressed(pcam_root: Path, tmp_path: Path) -> None:
    root = _copy(pcam_root, tmp_path)
    for key in ('x', 'y'):
        path = split_paths(root, 'test')[key]
        with open(path, 'rb') as src, gzip.open(path.with_name(path.name + '.gz'), 'wb') as dst:
            shutil.copyfileobj(src, dst)
        path.unlink()
    ds = PCamDataset(root, 'test')
    np.testing.assert_array_equal(ds.labels, PCamDataset(pcam_root, 'test').labels)


def test_bad_inputs_name_file_and_expectation(pcam_root: Path, tmp_path: Path) -> None:
    root = _copy(pcam_root, tmp_path)
    paths = split_paths(root, 'test')
    with pytest.raises(FileNotFoundError, match='camelyonpatch_level_2_split_test_x.h5'):
        PCamDataset(tmp_path / 'empty', 'test')
    with pytest.raises(ValueError, match='unknown PCam split'):
        PCamDataset(root, 'holdout')

    with h5py.File(paths['y'], 'w') as f:  # fewer labels than images
        f['y'] = np.zeros((5, 1, 1, 1), np.uint8)
    with pytest.raises(PCamFormatError, match=r'32 images but .* 5 labels'):
        PCamDataset(root, 'test')

    with h5py.File(paths['y'], 'w') as f:
        f['labels'] = np.zeros((32, 1, 1, 1), np.uint8)
    with pytest.raises(PCamFormatError, match=r"no dataset 'y'"):
        PCamDataset(root, 'test')

    with h5py.File(paths['x'], 'w') as f:
        f['x'] = np.zeros((32, 64, 64, 3), np.uint8)
    with pytest.raises(PCamFormatError, match=r'\(32, 64, 64, 3\).*expected \(N, 96, 96, 3\) uint8'):
        PCamDataset(root, 'test')

    data = split_paths(pcam_root, 'test')['x'].read_bytes()
    paths['x'].write_bytes(data[:len(data) // 3])
    with pytest.raises(PCamFormatError, match='truncated or corrupt'):
        PCamDataset(root, 'test')

    paths['x'].unlink()
    gz = paths['x'].with_name(paths['x'].name + '.gz')
    gz.write_bytes(gzip.compress(data)[:1000])
    with pytest.raises(PCamFormatError, match='corrupt or truncated gzip'):
        PCamDataset(root, 'test')
    assert not paths['x'].exists() and not list(root.glob('*.partial*'))
