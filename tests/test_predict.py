"""The fast CPU path: every backend against eager float32 on a model whose outputs vary, batching, errors."""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

from timm_inception_pcam import predict as predict_mod
from timm_inception_pcam.constants import PCAM_MEAN, PCAM_STD
from timm_inception_pcam.predict import BACKENDS, create_predictor, fold_batchnorm, resolve_backend
from timm_inception_pcam.preprocess import preprocess_patches

N = 32


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """One intra-op thread: on two cores shared with other jobs, two OpenMP threads run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _patches(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy patches whose label is visible: class 1 has a dark blob in the centre 32x32 region."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2)
    x = rng.normal(200, 25, (n, 96, 96, 3))
    yy, xx = np.mgrid[:96, :96]
    for i in np.flatnonzero(labels):
        cy, cx, r = rng.uniform(38, 58, 2).tolist() + [rng.uniform(5, 12)]
        x[i][(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] -= rng.uniform(60, 120)
    return np.clip(x, 0, 255).astype(np.uint8), labels


@pytest.fixture(scope='module')
def data() -> tuple[np.ndarray, np.ndarray]:
    return _patches(N, seed=1)


@pytest.fixture(scope='module')
def model() -> nn.Module:
    """Tiny inception_v4_pcam with BN statistics and a classifier fitted to labelled patches: its logits vary."""
    from export.golden import train_tiny_model

    patches, labels = _patches(64, seed=0)
    return train_tiny_model(patches, labels, steps=80)


@pytest.fixture(scope='module')
def reference(model: nn.Module, data) -> np.ndarray:
    return create_predictor(model, 'eager').predict_logits(data[0])


def test_reference_outputs_vary(reference: np.ndarray, data) -> None:
    assert reference.std(axis=0).min() > 0.5, 'a parity check on near-constant logits would mean nothing'
    assert (reference.argmax(1) == data[1]).mean() > 0.8, 'the calibrated model should separate the classes'


@pytest.mark.parametrize('backend', ['channels_last', 'bf16'])
def test_torch_backends_match_eager(model: nn.Module, data, reference: np.ndarray, backend: str) -> None:
    predictor = create_predictor(model, backend, batch_size=16)
    assert predictor.backend == backend
    probs = predictor(data[0])
    assert probs.shape == (N, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    logits = predictor.predict_logits(data[0])
    if backend == 'channels_last':  # float32 with BatchNorm folded: equal up to rounding
        np.testing.assert_allclose(logits, reference, atol=1e-3 * np.abs(reference).max())
        assert (logits.argmax(1) == reference.argmax(1)).all()
    else:  # bfloat16: 8-bit mantissa, decisions (nearly) unchanged
        assert np.corrcoef(logits[:, 1] - logits[:, 0], reference[:, 1] - reference[:, 0])[0, 1] > 0.99
        assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.95
        assert np.abs(logits - reference).max() > 0, 'bf16 should not be bit-identical to float32'


def test_onnxruntime_from_module_and_file(model: nn.Module, data, reference: np.ndarray, tmp_path: Path) -> None:
    from export.onnx import export_onnx
    from export.spec import IOSpec

    from_module = create_predictor(model, 'onnxruntime', batch_size=32)
    assert from_module.backend == 'onnxruntime'
    np.testing.assert_allclose(from_module.predict_logits(data[0]), reference, atol=1e-3)

    path = export_onnx(model, tmp_path / 'tiny.onnx', spec=IOSpec(mean=PCAM_MEAN, std=PCAM_STD))
    from_file = create_predictor(str(path), batch_size=7)  # 'auto' with a file: onnxruntime
    assert from_file.backend == 'onnxruntime' and from_file.mean == PCAM_MEAN and from_file.num_classes == 2
    np.testing.assert_allclose(from_file(data[0]), create_predictor(model, 'eager')(data[0]), atol=1e-4)
    with pytest.raises(ValueError, match='tiny.onnx.*stores preprocessing mean'):
        create_predictor(path, mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match='an ONNX file runs on onnxruntime'):
        create_predictor(path, 'bf16')


def test_batching_and_normalised_entry(model: nn.Module, data, reference: np.ndarray) -> None:
    predictor = create_predictor(model, 'eager', batch_size=5)  # 32 = 6 x 5 + 2
    np.testing.assert_allclose(predictor.predict_logits(data[0]), reference, rtol=1e-4, atol=1e-4)
    x = torch.from_numpy(preprocess_patches(data[0], PCAM_MEAN, PCAM_STD))
    np.testing.assert_allclose(predictor.logits(x), reference, rtol=1e-4, atol=1e-4)
    flipped = torch.flip(x, dims=(-1,))  # a non-contiguous view, as test-time augmentation passes
    fast = create_predictor(model, 'channels_last', batch_size=16)
    np.testing.assert_allclose(fast.logits(flipped), predictor.logits(flipped.contiguous()), rtol=1e-3, atol=1e-3)
    assert predictor(data[0][:0]).shape == (0, 2)
    assert predictor(data[0][0]).shape == (1, 2)  # a single HWC patch


def test_mean_std_default_to_pretrained_cfg_and_matter(model: nn.Module, data) -> None:
    predictor = create_predictor(model, 'eager')
    assert predictor.mean == tuple(model.pretrained_cfg['mean']) and predictor.std == tuple(model.pretrained_cfg['std'])
    other = create_predictor(model, 'eager', mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert np.abs(other.predict_logits(data[0][:8]) - predictor.predict_logits(data[0][:8])).max() > 1e-3


def test_threads_are_set_while_predicting_and_restored(model: nn.Module, data) -> None:
    seen = []
    predictor = create_predictor(model, 'channels_last', threads=2)
    handle = predictor._run.model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    predictor(data[0][:4])
    handle.remove()
    assert seen == [2] and torch.get_num_threads() == 1


def test_fold_batchnorm_leaves_the_original(model: nn.Module, data) -> None:
    folded = fold_batchnorm(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn > 0 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn
    x = torch.from_numpy(preprocess_patches(data[0][:8]))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_compile_pads_short_batches() -> None:
    """torch.compile backend on a small conv-BN net: a short last batch is padded (not recompiled) and sliced back."""
    from timm.layers import ConvNormAct

    torch.manual_seed(0)
    net = nn.Sequential(ConvNormAct(3, 8, 3, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    net[0].bn.running_mean.uniform_(-0.5, 0.5)
    net[0].bn.running_var.uniform_(0.5, 2.0)
    patches, _ = _patches(6, seed=3)
    try:
        predictor = create_predictor(net, 'compile', batch_size=4)
        out = predictor.predict_logits(patches)
    except Exception as e:  # no C++ toolchain for inductor: say so instead of failing
        pytest.skip(f'torch.compile unavailable here: {type(e).__name__}: {e}')
    reference = create_predictor(net, 'eager').predict_logits(patches)
    assert reference.std(axis=0).min() > 1e-3
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4)


def test_auto_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(predict_mod, 'cpu_has_amx', lambda: True)
    assert resolve_backend('auto') == 'bf16'
    monkeypatch.setattr(predict_mod, 'cpu_has_amx', lambda: False)
    assert resolve_backend('auto') == 'channels_last'
    assert resolve_backend('auto', onnx_file=True) == 'onnxruntime'
    assert set(BACKENDS) >= {'eager', 'channels_last', 'bf16', 'compile', 'onnxruntime'}


def test_bad_input_is_named(model: nn.Module, data, tmp_path: Path) -> None:
    predictor = create_predictor(model, 'eager')
    with pytest.raises(ValueError, match='dtype uint8'):
        predictor(data[0].astype(np.float32))
    with pytest.raises(ValueError, match=r'\(N, 96, 96, 3\)'):
        predictor(data[0][:, :64])
    with pytest.raises(ValueError, match="backend 'fast' not supported"):
        create_predictor(model, 'fast')
    with pytest.raises(ValueError, match='batch_size must be at least 1'):
        create_predictor(model, batch_size=0)
    with pytest.raises(FileNotFoundError, match='missing.onnx'):
        create_predictor(tmp_path / 'missing.onnx')
    with pytest.raises(ValueError, match='CPU path'):
        create_predictor(timm.create_model('inception_v4_pcam', depths=(1, 1, 1), device='meta'))
    with pytest.raises(ValueError, match='std must be 3 positive values'):
        create_predictor(model, std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match='float32 NCHW'):
        predictor.logits(torch.zeros(2, 3, 96, 96, dtype=torch.float64))
