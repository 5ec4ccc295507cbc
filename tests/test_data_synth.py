"""Synthetic PCam: official layout, determinism, the centre rule, and the `synth` / `info` commands."""
import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from timm_inception_pcam.data import META_COLUMNS, PCamDataset, split_paths, synthesize_pcam
from timm_inception_pcam.data.__main__ import main


@pytest.fixture(scope='module')
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('synth')
    synthesize_pcam(root, 256, seed=4, n_valid=24, n_test=16)
    return root


def test_official_layout(synth_root: Path) -> None:
    for split, n in (('train', 256), ('valid', 24), ('test', 16)):
        paths = split_paths(synth_root, split)
        with h5py.File(paths['x'], 'r') as fx, h5py.File(paths['y'], 'r') as fy:
            assert list(fx.keys()) == ['x'] and list(fy.keys()) == ['y']
            assert fx['x'].shape == (n, 96, 96, 3) and fx['x'].dtype == np.uint8
            assert fy['y'].shape == (n, 1, 1, 1) and fy['y'].dtype == np.uint8
            labels = fy['y'][:].ravel()
        assert abs(labels.mean() - 0.5) <= 0.05
        with open(paths['meta'], newline='') as f:
            rows = list(csv.reader(f))
        assert rows[0] == ['', *META_COLUMNS] and len(rows) == n + 1
        assert [r[4] for r in rows[1:]] == [str(bool(v)) for v in labels]  # center_tumor_patch is the label


def test_deterministic_per_seed(synth_root: Path, tmp_path: Path) -> None:
    again = synthesize_pcam(tmp_path / 'a', 256, seed=4, n_valid=24, n_test=16)
    other = synthesize_pcam(tmp_path / 'b', 256, seed=5, n_valid=24, n_test=16)
    ref = PCamDataset(synth_root, 'train').read_batch(range(256))[0]
    np.testing.assert_array_equal(PCamDataset(tmp_path / 'a', 'train').read_batch(range(256))[0], ref)
    assert again['train_meta'].read_bytes() == split_paths(synth_root, 'train')['meta'].read_bytes()
    assert not np.array_equal(PCamDataset(tmp_path / 'b', 'train').read_batch(range(256))[0], ref)
    assert other['valid_x'].is_file()


def test_label_lives_in_the_centre(synth_root: Path) -> None:
    """Dark nuclear material in the centre 32x32 predicts the label; the same outside the centre does not."""
    ds = PCamDataset(synth_root, 'train', with_meta=True)
    images, labels = ds.read_batch(np.arange(len(ds)))
    grey = images.astype(np.float32).mean(-1)
    dark = grey < np.percentile(grey, 5)
    centre = dark[:, 32:64, 32:64].mean((1, 2))
    ring = dark.copy()
    ring[:, 32:64, 32:64] = False
    assert roc_auc_score(labels, centre) > 0.8
    assert roc_auc_score(labels, ring.mean((1, 2))) < 0.7
    ring_only = sum(m['tumor_patch'] and not m['center_tumor_patch'] for m in ds.meta)
    assert 0.25 * (labels == 0).sum() < ring_only < 0.75 * (labels == 0).sum()  # negatives with tumour outside
    assert all(m['tumor_patch'] for m, y in zip(ds.meta, labels) if y == 1)


def test_he_like_colours(synth_root: Path) -> None:
    images = PCamDataset(synth_root, 'valid').read_batch(range(24))[0].reshape(-1, 3).astype(np.float32)
    r, g, b = images.mean(0)
    assert g < r and g < b  # pink / purple: eosin and haematoxylin both absorb green most
    assert images.std(0).min() > 10  # texture, not flat colour


def test_gzip_output_reads_back(tmp_path: Path) -> None:
    files = synthesize_pcam(tmp_path, 16, seed=1, n_valid=4, n_test=4, gzip=True)
    assert files['test_x'].name.endswith('.h5.gz') and not split_paths(tmp_path, 'test')['x'].exists()
    ds = PCamDataset(tmp_path, 'test')
    assert len(ds) == 4 and split_paths(tmp_path, 'test')['x'].is_file()


def test_cli_synth_and_info(tmp_path: Path, capsys) -> None:
    assert main(['synth', '--root', str(tmp_path), '--n', '32', '--seed', '2', '--n-valid', '8', '--n-test', '8']) == 0
    assert 'synth: wrote 9 files' in capsys.readouterr().out
    assert main(['info', '--data-dir', str(tmp_path)]) == 0
    assert 'train: 32 patches, 16 metastatic' in capsys.readouterr().out
    with pytest.raises(ValueError, match='at least 1 patch'):
        synthesize_pcam(tmp_path / 'bad', 8, seed=0, n_valid=0)

