"""The fast CPU path: every backend against eager float32 on a model whose outputs vary, batching, errors."""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

from timm_inception_pcam import predict as predict_mod
from timm_inception_pcam.constants import PCAM_MEAN, PCAM_STD
from timm_inception_pcam.predict import (
    BACKENDS,
    DecisionCheck,
    class1_margin,
    create_predictor,
    fold_batchnorm,
    resolve_backend,
    undecided,
)
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
    assert resolve_backend('auto') == 'bf16_checked'
    monkeypatch.setattr(predict_mod, 'cpu_has_amx', lambda: False)
    assert resolve_backend('auto') == 'channels_last'
    assert resolve_backend('auto', onnx_file=True) == 'onnxruntime'
    assert set(BACKENDS) >= {'eager', 'channels_last', 'bf16', 'bf16_checked', 'compile', 'onnxruntime'}


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


def test_undecided_bounds_the_mean_probability() -> None:
    logit = float(np.log(0.9 / 0.1))  # the margin at which p1 = 0.9
    margins = np.array([0.1, -0.1, 0.3, -0.3, np.nan, np.inf, -np.inf, logit + 0.1])
    assert undecided(margins, [0.5], 0.2).tolist() == [True, True, False, False, True, False, False, False]
    assert undecided(margins, [0.5, 0.9], 0.2).tolist() == [True, True, False, False, True, False, False, True]
    assert not undecided(margins, [], 0.2)[:4].any()
    # two views far from 0.5 on either side average to p1 = 0.5: in doubt at 0.5 however small the bound
    views = np.array([[3.0, 3.0], [-3.0, 3.0]])
    assert undecided(views, [0.5], 1e-6).tolist() == [True, False]
    assert not undecided(views, [0.5], 0.0)[1]


class _Fake:
    """Stand-in runners: exact logits from a table, the fast ones with a known margin error added."""

    def __init__(self, margins: np.ndarray, error: np.ndarray):
        self.margins, self.error, self.exact_calls = margins, error, []

    def _logits(self, x: torch.Tensor, error: np.ndarray) -> np.ndarray:
        idx = x[:, 0, 0, 0].long().numpy()
        m = self.margins[idx] + error[idx]
        return np.stack([-m / 2, m / 2], axis=1).astype(np.float32)

    def fast(self, x: torch.Tensor) -> np.ndarray:
        return self._logits(x, self.error)

    def exact(self, x: torch.Tensor) -> np.ndarray:
        self.exact_calls.append(x[:, 0, 0, 0].long().tolist())
        return self._logits(x, np.zeros_like(self.error))


def test_decision_check_settles_what_bf16_could_flip() -> None:
    rng = np.random.default_rng(0)
    n = 400
    margins = rng.normal(0, 4, n)
    error = rng.uniform(-0.25, 0.25, n)
    error[:8] = 0.25  # the first batch measures 0.25: bound = 2 x 0.25
    margins[100], error[100] = 30.0, 3.0  # a large error far from any threshold, as bf16 gives huge margins
    fake = _Fake(margins, error)
    check = DecisionCheck(fake.fast, fake.exact, thresholds=(0.5, 0.8), safety=2.0)
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, 96, 96)
    assert check.bound == float('inf')
    out = np.concatenate([check(x[s:s + 8]) for s in range(0, n, 8)])
    got = class1_margin(out)
    assert fake.exact_calls[0] == list(range(8))  # the first batch is measured in full
    np.testing.assert_allclose(check.errors[:8], 0.25, atol=1e-5)  # measured on the first batch
    for t in (0.5, 0.8):  # decisions at the configured thresholds are float32's ...
        assert ((got >= np.log(t / (1 - t))) == (margins >= np.log(t / (1 - t)))).all()
    plain = margins + error  # ... which the fast path alone misses
    assert ((plain >= 0) != (margins >= 0)).any()
    rechecked = {i for call in fake.exact_calls for i in call}
    kept = np.setdiff1d(np.arange(n), sorted(rechecked))
    assert len(kept) > n // 2 and 100 in kept, 'most patches should keep their fast logits'
    np.testing.assert_allclose(got[kept], plain[kept], atol=1e-5)
    stats = check.stats()
    assert stats['patches'] == n and stats['rechecked'] == len([i for c in fake.exact_calls for i in c])
    assert stats['bound'] == pytest.approx(2.0 * np.quantile(np.abs(error[sorted(rechecked)]), 0.9), rel=1e-4)


def test_decision_check_bound_grows_with_what_it_sees() -> None:
    margins = np.array([5.0] * 4 + [0.3] * 4 + [0.01] * 12)
    error = np.array([0.01] * 4 + [-0.2] * 4 + [0.5] * 12)  # later patches err more than the first batch showed
    fake = _Fake(margins, error)
    check = DecisionCheck(fake.fast, fake.exact, thresholds=(0.5,), safety=4.0)
    x = torch.arange(20, dtype=torch.float32)[:, None, None, None].expand(20, 3, 96, 96)
    check(x[:4])
    assert check.bound == pytest.approx(0.04, rel=1e-3)
    out = check(x[4:8])  # fast margins 0.1: outside the bound of 0.04, kept (and wrong by 0.2, not flipped)
    np.testing.assert_allclose(class1_margin(out), 0.1, atol=1e-5)
    out = check(x[8:12])  # fast margins 0.51: far outside, and flipped: an error the first batch did not warn of
    assert (class1_margin(out) > 0).all() and check.rechecked == 4


def test_decision_check_keeps_a_bounded_history(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(predict_mod, 'ERROR_HISTORY', 6)
    margins = np.zeros(20)  # every patch sits on the threshold: all are re-checked
    error = np.linspace(0.01, 0.2, 20)
    error[0] = 1.0
    fake = _Fake(margins, error)
    check = DecisionCheck(fake.fast, fake.exact, thresholds=(0.5,), safety=100.0)
    x = torch.arange(20, dtype=torch.float32)[:, None, None, None].expand(20, 3, 96, 96)
    for s in range(0, 20, 4):
        check(x[s:s + 4])
    assert check.rechecked == 20 and len(check.errors) == 6
    np.testing.assert_allclose(check.errors, error[-6:], rtol=1e-5)  # the most recent measurements
    assert check.stats()['margin_error_max'] == pytest.approx(1.0, rel=1e-5)  # the largest ever is still reported
    assert check.bound == pytest.approx(100.0 * np.quantile(error[-6:], 0.9), rel=1e-4)
    with pytest.raises(ValueError, match='strictly between 0 and 1'):
        DecisionCheck(fake.fast, fake.exact, thresholds=(1.0,))
    with pytest.raises(ValueError, match='safety must be at least 1'):
        DecisionCheck(fake.fast, fake.exact, thresholds=(0.5,), safety=0.5)


def test_bf16_checked_matches_float32_decisions(model: nn.Module, reference: np.ndarray, data) -> None:
    fp32 = class1_margin(reference)
    later = np.sort(fp32[8:])  # a threshold between two patches of the later batches, so some are in doubt
    middle = (later[len(later) // 2 - 1] + later[len(later) // 2]) / 2
    thresholds = (0.5, float(1 / (1 + np.exp(-middle))))
    predictor = create_predictor(model, 'bf16_checked', batch_size=8, thresholds=thresholds)
    assert predictor.backend == 'bf16_checked'
    logits = predictor.predict_logits(data[0])
    for t in thresholds:
        assert ((class1_margin(logits) >= np.log(t / (1 - t))) == (fp32 >= np.log(t / (1 - t)))).all()
    info = predictor.check.stats()
    assert info['patches'] == N and 8 <= info['rechecked'] <= N and info['margin_error_median'] > 0
    plain = create_predictor(model, 'bf16', batch_size=8).predict_logits(data[0])
    exact = create_predictor(model, 'channels_last', batch_size=8).predict_logits(data[0])
    kept = np.abs(logits - plain).max(axis=1) == 0  # not re-checked: the bf16 logits as they came
    assert 0 < kept.sum() < N - 8, 'the first batch is re-checked in full, and not every patch after it'
    np.testing.assert_allclose(logits[~kept], exact[~kept], rtol=1e-4, atol=1e-4)  # the others: float32's
    assert kept.sum() + info['rechecked'] == N
    with pytest.raises(ValueError, match='checks binary decisions'):
        create_predictor(timm.create_model('inception_v4_pcam', depths=(1, 1, 1), num_classes=3), 'bf16_checked')
