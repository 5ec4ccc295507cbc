"""Proof that it learns: reduced-depth Inception-v4, trained by our trainer on synthetic PCam, reaches a validation
ROC AUC of at least 0.95 and beats a baseline that cannot see the centre.

The synthetic set labels a patch by tumour cells in its centre 32x32 region, and half of its negatives carry a
tumour cluster in the outer ring only. The baseline is a logistic regression on colour statistics of the outer ring
(everything but the centre 32x32): it sees exactly the evidence a model that ignores the centre could use. Tumour
clusters of positives often spill over into the ring, so it scores above chance; only a model that looks at the
centre can separate the ring-only negatives.

One CPU run of 768 patch updates (a few minutes on 2 busy cores), hence its own file.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from timm_inception_pcam.checkpoint import load_model
from timm_inception_pcam.train import main

N_TRAIN, N_VALID = 384, 192
SEED = 11


def ring_colour_features(patches: np.ndarray) -> np.ndarray:
    """Per-channel mean, std and 10/50/90 % quantiles of the RGB and optical density of the outer ring pixels, and
    the fraction of dark (nucleus-like) ring pixels. (N, 96, 96, 3) uint8 -> (N, 31) float."""
    ring = np.ones(patches.shape[1:3], dtype=bool)
    ring[32:64, 32:64] = False
    rgb = patches[:, ring].astype(np.float32) / 255.0  # (N, P, 3)
    od = -np.log(np.clip(rgb, 1.0 / 255.0, 1.0))
    feats = []
    for values in (rgb, od):
        feats += [values.mean(1), values.std(1), *np.quantile(values, (0.1, 0.5, 0.9), axis=1)]
    feats.append((rgb.mean(2) < 0.45).mean(1, keepdims=True))
    return np.concatenate(feats, axis=1)


def read_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    from timm_inception_pcam.data import PCamDataset

    ds = PCamDataset(root, split)
    return ds.read_batch(np.arange(len(ds)))


def test_reduced_inception_v4_learns_the_centre_rule(tmp_path) -> None:
    from timm_inception_pcam.data import synthesize_pcam

    synthesize_pcam(tmp_path / 'pcam', N_TRAIN, seed=SEED, n_valid=N_VALID, n_test=8)

    x_train, y_train = read_split(tmp_path / 'pcam', 'train')
    x_valid, y_valid = read_split(tmp_path / 'pcam', 'valid')
    assert 0.4 < y_valid.mean() < 0.6
    baseline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    baseline.fit(ring_colour_features(x_train), y_train)
    baseline_auc = roc_auc_score(y_valid, baseline.predict_proba(ring_colour_features(x_valid))[:, 1])

    summary = main([
        '--data-dir', str(tmp_path / 'pcam'), '--output', str(tmp_path / 'run'), '--model', 'inception_v4_pcam',
        '--model-kwargs', 'depths=1,1,1', '--no-pretrained', '--epochs', '2', '-b', '32', '--lr', '2e-3',
        '--warmup-epochs', '0.5', '--no-model-ema', '--workers', '0', '--in-memory', '--seed', str(SEED),
        '--no-progress'])
    aucs = [row['val_roc_auc'] for row in summary.history]
    print(f'validation ROC AUC per epoch {np.round(aucs, 4).tolist()}, ring-colour baseline {baseline_auc:.4f}')

    assert summary.best_metric >= 0.95, f'best validation ROC AUC {summary.best_metric:.4f} < 0.95 ({aucs})'
    assert summary.best_metric > baseline_auc + 0.05, (summary.best_metric, baseline_auc)
    assert baseline_auc < 0.95, f'the centre-blind baseline should not solve the task, got {baseline_auc:.4f}'
    # The best checkpoint scores what the log says on the whole validation split, through the evaluator's loader
    # (float32 here, the trainer's autocast may differ in the last digits).
    from timm_inception_pcam.data import create_pcam_transform

    model = load_model(None, summary.best_checkpoint)
    transform = create_pcam_transform(is_training=False)
    with torch.no_grad():
        probs = torch.cat([model(torch.stack([transform(p) for p in x_valid[i:i + 64]])).softmax(1)[:, 1]
                           for i in range(0, len(x_valid), 64)])
    assert roc_auc_score(y_valid, probs.numpy()) == pytest.approx(summary.best_metric, abs=0.01)
