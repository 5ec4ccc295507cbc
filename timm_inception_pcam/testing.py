"""The one "train a tiny model in seconds" helper, for tests, golden files and examples.

Not a training recipe (that is `timm_inception_pcam.train`): a reduced-depth model whose outputs vary with the input,
so that comparisons between runtimes, precisions and backends mean something (a randomly initialised Inception gives
near-constant logits).
"""
from typing import Any

import numpy as np
import torch

from .preprocess import batch_slices, preprocess_patches

__all__ = ['TINY_MODEL', 'TINY_KWARGS', 'blob_patches', 'train_tiny_model']

TINY_MODEL = 'inception_v4_pcam'
TINY_KWARGS: dict[str, Any] = {'depths': (1, 1, 1)}


def blob_patches(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy uint8 patches whose label is visible (class 1: a dark blob in the centre 32x32 region), and the labels:
    what `train_tiny_model` fits in seconds, and what comparisons of its outputs run on."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2)
    x = rng.normal(200, 25, (n, 96, 96, 3))
    yy, xx = np.mgrid[:96, :96]
    for i in np.flatnonzero(labels):
        cy, cx, r = rng.uniform(38, 58, 2).tolist() + [rng.uniform(5, 12)]
        x[i][(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] -= rng.uniform(60, 120)
    return np.clip(x, 0, 255).astype(np.uint8), labels


def train_tiny_model(patches: np.ndarray, labels: np.ndarray, *, steps: int = 60, seed: int = 0,
                     batch_size: int = 32) -> torch.nn.Module:
    """Reduced-depth model whose logits vary with the input: BN statistics from `patches` (uint8 NHWC), then the
    classifier trained for `steps` Adam steps on the frozen features (0: BN statistics only). Eval mode."""
    import timm

    import timm_inception_pcam  # noqa: F401  (registers the models)
    torch.manual_seed(seed)
    model = timm.create_model(TINY_MODEL, num_classes=2, **TINY_KWARGS)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the warm-up batches
    x = torch.from_numpy(preprocess_patches(patches))
    model.train()
    with torch.no_grad():  # one pass: BN statistics, and the (batch-normalised) features the head is trained on
        features = torch.cat([model.forward_head(model.forward_features(x[s]), pre_logits=True)
                              for s in batch_slices(len(x), batch_size)])
    model.eval()
    head = model.get_classifier()
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    target = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(features), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
