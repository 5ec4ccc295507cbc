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

pytest.importorskip('openvino', reason='openvino is a declared dependency; missing only in a broken environment')
from timm_inception_pcam.inference.openvino_runner import OpenVINORunner, weights_sha256  # noqa: E402


def _patches(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy patches whose label is visible (class 1: a dark blob in the centre), so a fitted model's logits vary."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2)
    x = rng.normal(200, 25, (n, 96, 96, 3))
    yy, xx = np.mgrid[:96, :96]
    for i in np.flatnonzero(labels):
        cy, cx, r = rng.uniform(38, 58, 2).tolist() + [rng.uniform(5, 12)]
        x[i][(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] -= rng.uniform(60, 120)
    return np.clip(x, 0, 255).astype(np.uint8), labels


@pytest.fixture(scope='module')
def model() -> torch.nn.Module:
    from export.golden import train_tiny_model

    return train_tiny_model(*_patches(64, seed=0), steps=80)


@pytest.fixture(scope='module')
def patches() -> np.ndarray:
    return _patches(40, seed=1)[0]


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


def test_weights_hash_follows_the_weights(model) -> None:
    before = weights_sha256(model)
    changed = timm.create_model('inception_v4_pcam', depths=(1, 1, 1))
    changed.load_state_dict(model.state_dict())
    assert weights_sha256(changed) == before
    with torch.no_grad():
        changed.get_classifier().bias.add_(1e-3)
    assert weights_sha256(changed) != before


def test_errors(model, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="precision 'fp8' not supported: expected one of fp32, bf16, int8"):
        OpenVINORunner(model, 'fp8', cache_dir=tmp_path)
    with pytest.raises(UsageError, match='int8 needs calibration patches'):
        OpenVINORunner(model, 'int8', cache_dir=tmp_path)
    with pytest.raises(InferenceError, match='missing.xml: OpenVINO IR not found'):
        OpenVINORunner(tmp_path / 'missing.xml')
    with pytest.raises(UsageError, match='batch_size must be >= 1'):
        OpenVINORunner(model, 'fp32', cache_dir=tmp_path, batch_size=0)
