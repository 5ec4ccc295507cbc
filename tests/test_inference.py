"""The inference layer: every torch backend against eager float32 on a model whose outputs vary, onnxruntime,
checkpoints, the decision check, batching, backend resolution and errors."""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

from timm_inception_pcam.constants import PCAM_MEAN, PCAM_STD
from timm_inception_pcam.errors import CheckpointError, UsageError
from timm_inception_pcam.inference import Runner, RunnerSpec, create_runner, probabilities
from timm_inception_pcam.inference import check as check_mod
from timm_inception_pcam.inference import factory as factory_mod
from timm_inception_pcam.inference.check import LARGEST_FACTOR, DecisionCheck, class1_margin, error_range, undecided
from timm_inception_pcam.inference.factory import BACKENDS, resolve, resolve_backend
from timm_inception_pcam.inference.torch_runner import fold_batchnorm
from timm_inception_pcam.preprocess import preprocess_patches
from timm_inception_pcam.testing import blob_patches

N = 32


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """One intra-op thread: on two cores shared with other jobs, two OpenMP threads run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope='module')
def data() -> tuple[np.ndarray, np.ndarray]:
    return blob_patches(N, seed=1)


@pytest.fixture(scope='module')
def model() -> nn.Module:
    """Tiny inception_v4_pcam with BN statistics and a classifier fitted to labelled patches: its logits vary."""
    from timm_inception_pcam.testing import train_tiny_model

    patches, labels = blob_patches(64, seed=0)
    return train_tiny_model(patches, labels, steps=80)


@pytest.fixture(scope='module')
def reference(model: nn.Module, data) -> np.ndarray:
    return create_runner(model, 'eager').logits(data[0])


def test_reference_outputs_vary(reference: np.ndarray, data) -> None:
    assert reference.std(axis=0).min() > 0.5, 'a parity check on near-constant logits would mean nothing'
    assert (reference.argmax(1) == data[1]).mean() > 0.8, 'the calibrated model should separate the classes'


@pytest.mark.parametrize('backend', ['channels_last', 'bf16'])
def test_torch_backends_match_eager(model: nn.Module, data, reference: np.ndarray, backend: str) -> None:
    runner = create_runner(model, backend, batch_size=16)
    assert runner.spec.backend == backend and isinstance(runner, Runner)
    assert runner.spec.precision == ('fp32' if backend == 'channels_last' else 'bf16')
    probs = probabilities(runner, data[0])
    assert probs.shape == (N, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    logits = runner.logits(data[0])
    if backend == 'channels_last':  # float32 with BatchNorm folded: equal up to rounding
        np.testing.assert_allclose(logits, reference, atol=1e-3 * np.abs(reference).max())
        assert (logits.argmax(1) == reference.argmax(1)).all()
    else:  # bfloat16: 8-bit mantissa, decisions (nearly) unchanged
        assert np.corrcoef(logits[:, 1] - logits[:, 0], reference[:, 1] - reference[:, 0])[0, 1] > 0.99
        assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.95
        assert np.abs(logits - reference).max() > 0, 'bf16 should not be bit-identical to float32'


def test_onnxruntime_runs_files_not_modules(model: nn.Module, data, reference: np.ndarray, tmp_path: Path) -> None:
    from export.onnx import export_onnx
    from export.spec import IOSpec

    with pytest.raises(UsageError, match='export the model first'):  # no hidden export to a temporary file
        create_runner(model, 'onnxruntime')

    path = export_onnx(model, tmp_path / 'tiny.onnx', spec=IOSpec(mean=PCAM_MEAN, std=PCAM_STD))
    explicit = create_runner(path, 'onnxruntime', batch_size=32)
    assert explicit.spec.backend == 'onnxruntime' and isinstance(explicit, Runner)
    np.testing.assert_allclose(explicit.logits(data[0]), reference, atol=1e-3)

    from_file = create_runner(str(path), batch_size=7)  # 'auto' with a file: onnxruntime
    spec = from_file.spec
    assert spec.backend == 'onnxruntime' and spec.mean == PCAM_MEAN and len(spec.label_names) == 2
    assert (spec.precision, spec.source, spec.extra['baked_in']) == ('fp32', str(path), False)
    np.testing.assert_allclose(probabilities(from_file, data[0]), probabilities(create_runner(model, 'eager'), data[0]),
                               atol=1e-4)
    with pytest.raises(ValueError, match='tiny.onnx.*stores preprocessing mean'):
        create_runner(path, mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match='an ONNX file runs on onnxruntime'):
        create_runner(path, 'bf16')
    with pytest.raises(UsageError, match='runs at precision fp32, but fp16 was asked'):
        create_runner(path, precision='fp16')
    with pytest.raises(UsageError, match='onnxruntime runs on the CPU'):
        create_runner(path, device='cuda')


def test_checkpoint_path_loads_through_load_model(model: nn.Module, data, reference: np.ndarray,
                                                  tmp_path: Path) -> None:
    from timm_inception_pcam.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path / 'tiny.pth.tar', model, arch='inception_v4_pcam',
                           model_kwargs={'depths': (1, 1, 1)})
    runner = create_runner(path, 'eager')
    assert runner.spec.source == str(path) and runner.spec.extra['model'] == 'inception_v4_pcam'
    np.testing.assert_allclose(runner.logits(data[0]), reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match='missing.pth.tar'):
        create_runner(tmp_path / 'missing.pth.tar')


def test_eager_autocast_precisions(model: nn.Module, data, reference: np.ndarray) -> None:
    for precision in ('bf16', 'fp16'):
        runner = create_runner(model, 'eager', precision=precision, batch_size=16)
        assert (runner.spec.backend, runner.spec.precision) == ('eager', precision)
        logits = runner.logits(data[0])
        assert np.abs(logits - reference).max() > 0, f'{precision} autocast should not be bit-identical to float32'
        assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.9
        assert np.corrcoef(class1_margin(logits), class1_margin(reference))[0, 1] > 0.99


def test_batching_and_views(model: nn.Module, data, reference: np.ndarray) -> None:
    runner = create_runner(model, 'eager', batch_size=5)  # 32 = 6 x 5 + 2
    np.testing.assert_allclose(runner.logits(data[0]), reference, rtol=1e-4, atol=1e-4)
    flipped = data[0][:, :, ::-1]  # a non-contiguous view
    fast = create_runner(model, 'channels_last', batch_size=16)
    np.testing.assert_allclose(fast.logits(flipped), runner.logits(np.ascontiguousarray(flipped)), rtol=1e-3, atol=1e-3)
    assert np.abs(runner.logits(flipped) - reference).max() > 1e-3  # the flip is another input
    assert probabilities(runner, data[0][:0]).shape == (0, 2)
    assert probabilities(runner, data[0][0]).shape == (1, 2)  # a single HWC patch


def test_mean_std_default_to_pretrained_cfg_and_matter(model: nn.Module, data) -> None:
    runner = create_runner(model, 'eager')
    assert runner.spec.mean == tuple(model.pretrained_cfg['mean'])
    assert runner.spec.std == tuple(model.pretrained_cfg['std'])
    other = create_runner(model, 'eager', mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert other.spec.mean == (0.5, 0.5, 0.5)
    assert np.abs(other.logits(data[0][:8]) - runner.logits(data[0][:8])).max() > 1e-3


def test_threads_are_set_while_predicting_and_restored(model: nn.Module, data) -> None:
    seen = []
    runner = create_runner(model, 'channels_last', threads=2)
    handle = runner.model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    runner.logits(data[0][:4])
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
    patches, _ = blob_patches(6, seed=3)
    try:
        runner = create_runner(net, 'compile', batch_size=4)
        out = runner.logits(patches)
    except Exception as e:  # no C++ toolchain for inductor: say so instead of failing
        pytest.skip(f'torch.compile unavailable here: {type(e).__name__}: {e}')
    reference = create_runner(net, 'eager').logits(patches)
    assert reference.std(axis=0).min() > 1e-3
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4)


def test_auto_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(factory_mod, 'cpu_has_native_bf16', lambda: True)
    monkeypatch.setattr(factory_mod, 'openvino_available', lambda: True)
    assert resolve_backend('auto') == 'openvino_bf16_checked'
    assert resolve('auto', precision='int8') == ('openvino_cascade', 'int8')
    monkeypatch.setattr(factory_mod, 'openvino_available', lambda: False)
    assert resolve_backend('auto') == 'bf16_checked'
    monkeypatch.setattr(factory_mod, 'cpu_has_native_bf16', lambda: False)
    assert resolve_backend('auto') == 'channels_last'
    assert resolve_backend('auto', kind='onnx') == 'onnxruntime'
    assert resolve_backend('auto', kind='tensorrt') == 'tensorrt'
    assert set(BACKENDS) >= {'eager', 'channels_last', 'bf16', 'bf16_checked', 'compile', 'onnxruntime', 'tensorrt'}


def test_precision_picks_the_backend() -> None:
    assert resolve('auto', precision='bf16') == ('bf16', 'bf16')
    assert resolve('auto', precision='float32') == ('channels_last', 'fp32')  # an alias, folded
    assert resolve('auto', precision='fp16') == ('eager', 'fp16')
    assert resolve('auto', device='cuda') == ('eager', 'fp32')  # CUDA: fp32 unless autocast is asked for
    assert resolve('auto', device='cuda', precision='bf16') == ('eager', 'bf16')
    assert resolve('bf16_checked') == ('bf16_checked', 'bf16')
    assert resolve('eager', precision='none') == ('eager', 'fp32')
    with pytest.raises(UsageError, match='backend bf16 runs bfloat16: precision fp32'):
        resolve('bf16', precision='fp32')
    assert resolve('auto', precision='int8') == ('openvino_cascade', 'int8')  # int8 runs checked, on OpenVINO
    with pytest.raises(UsageError, match='precision int8 runs on OpenVINO .* not on backend eager'):
        resolve('eager', precision='int8')
    with pytest.raises(UsageError, match='backend openvino_cascade runs int8 .*: precision bf16'):
        resolve('openvino_cascade', precision='bf16')
    with pytest.raises(UsageError, match="precision 'fp8' not supported"):
        resolve('auto', precision='fp8')
    with pytest.raises(UsageError, match='does not run TensorRT plans'):
        resolve('eager', kind='tensorrt')
    with pytest.raises(UsageError, match='build one with python -m export.trt'):
        resolve('tensorrt')


def test_bad_input_is_named(model: nn.Module, data, tmp_path: Path) -> None:
    runner = create_runner(model, 'eager')
    with pytest.raises(ValueError, match='dtype uint8'):
        runner.logits(data[0].astype(np.float32))
    with pytest.raises(ValueError, match=r'\(N, 96, 96, 3\)'):
        runner.logits(data[0][:, :64])
    with pytest.raises(ValueError, match="backend 'fast' not supported"):
        create_runner(model, 'fast')
    with pytest.raises(ValueError, match='batch_size must be at least 1'):
        create_runner(model, batch_size=0)
    with pytest.raises(CheckpointError, match='missing.onnx'):
        create_runner(tmp_path / 'missing.onnx')
    with pytest.raises(UsageError, match=r"parameters on \['meta'\], but device cpu"):
        create_runner(timm.create_model('inception_v4_pcam', depths=(1, 1, 1), device='meta'))
    with pytest.raises(ValueError, match='std must be 3 positive values'):
        create_runner(model, std=(0.2, 0.0, 0.2))
    with pytest.raises(TypeError, match='expected a numpy array of uint8 patches'):
        runner.logits(torch.zeros(2, 96, 96, 3, dtype=torch.uint8))
    with pytest.raises(UsageError, match='expected a torch nn.Module or the path'):
        create_runner(42)


def test_undecided_bounds_the_mean_probability() -> None:
    logit = float(np.log(0.9 / 0.1))  # the margin at which p1 = 0.9
    margins = np.array([0.1, -0.1, 0.3, -0.3, np.nan, np.inf, -np.inf, logit + 0.1])
    assert undecided(margins, [0.5], (-0.2, 0.2)).tolist() == [True, True, False, False, True, False, False, False]
    assert undecided(margins, [0.5, 0.9], (-0.2, 0.2)).tolist() == [True, True, False, False, True, False, False,
                                                                      True]
    assert not undecided(margins, [], (-0.2, 0.2))[:4].any()
    # a biased fast path: errors in [0.05, 0.35] mean an exact margin in [m - 0.35, m - 0.05]
    assert undecided(margins, [0.5], (0.05, 0.35)).tolist() == [True, False, True, False, True, False, False, False]
    # two views far from 0.5 on either side average to p1 = 0.5: in doubt at 0.5 however small the range
    views = np.array([[3.0, 3.0], [-3.0, 3.0]])
    assert undecided(views, [0.5], (-1e-6, 1e-6)).tolist() == [True, False]
    assert not undecided(views, [0.5], (0.0, 0.0))[1]


def test_error_range_is_centred_and_capped() -> None:
    assert error_range(np.zeros(0), 12.0) == (float('-inf'), float('inf'))
    assert error_range(np.array([0.1, -0.1] * 32), 12.0) == (float('-inf'), float('inf'))  # two values, 64 times
    rng = np.random.default_rng(0)
    errors = -0.05 + rng.uniform(-0.01, 0.01, 500)  # biased, narrowly spread: the cap (3 x the largest) binds
    lo, hi = error_range(errors, 12.0)
    deviation = np.abs(errors - np.median(errors))
    assert (lo + hi) / 2 == pytest.approx(np.median(errors))
    assert (hi - lo) / 2 == pytest.approx(LARGEST_FACTOR * deviation.max()) and hi < 0
    heavy = np.concatenate([rng.normal(0, 0.001, 990), [0.2] * 10])  # a heavy tail: the percentile term binds
    lo, hi = error_range(heavy, 12.0)
    assert (hi - lo) / 2 == pytest.approx(12.0 * np.quantile(np.abs(heavy - np.median(heavy)), 0.9))
    assert hi < 0.2, 'a rare outlier alone does not widen the range (it came from patches far from a threshold)'


def _indexed(n: int) -> np.ndarray:
    """n patches carrying their index in the first pixel (low byte in red, high byte in green)."""
    x = np.zeros((n, 96, 96, 3), dtype=np.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    return x


class _Clock:
    """The time the checks read (`check.perf_counter`), advanced only by the stand-in runners' work."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(check_mod, 'perf_counter', fake)
    return fake


class _TableRunner:
    """A stand-in Runner: logits from a table of margins (plus an error), looked up by the patch's index; with a
    `clock`, each patch takes `cost` seconds of it."""

    def __init__(self, backend: str, margins: np.ndarray, error: np.ndarray, calls: list | None = None,
                 clock: _Clock | None = None, cost: float = 0.0):
        self.spec = RunnerSpec(backend=backend, precision='fp32', source='table')
        self.margins, self.error, self.calls, self.clock, self.cost = margins, error, calls, clock, cost

    def logits(self, patches: np.ndarray) -> np.ndarray:
        idx = patches[:, 0, 0, 0].astype(np.int64) + 256 * patches[:, 0, 0, 1].astype(np.int64)
        if self.calls is not None:
            self.calls.append(idx.tolist())
        if self.clock is not None:
            self.clock.now += self.cost * len(idx)
        m = self.margins[idx] + self.error[idx]
        return np.stack([-m / 2, m / 2], axis=1).astype(np.float32)

    def close(self) -> None:
        pass


class _Fake:
    """Stand-in runners: exact logits from a table, the fast ones with a known margin error added."""

    def __init__(self, margins: np.ndarray, error: np.ndarray):
        self.exact_calls: list[list[int]] = []
        self.fast = _TableRunner('fast', margins, error)
        self.exact = _TableRunner('exact', margins, np.zeros_like(error), self.exact_calls)


def test_decision_check_settles_what_bf16_could_flip() -> None:
    rng = np.random.default_rng(0)
    n = 400
    margins = rng.normal(0, 4, n)
    error = rng.uniform(-0.25, 0.25, n)
    error[:8] = np.linspace(-0.25, 0.25, 8)  # the first batch measures up to +-0.25
    margins[100], error[100] = 30.0, 3.0  # a large error far from any threshold, as bf16 gives huge margins
    fake = _Fake(margins, error)
    check = DecisionCheck(fake.fast, fake.exact, thresholds=(0.5, 0.8), safety=2.0)
    assert isinstance(check, Runner) and check.spec.backend == 'fast_checked'
    x = _indexed(n)
    assert check.error_range == (float('-inf'), float('inf'))
    out = np.concatenate([check.logits(x[s:s + 8]) for s in range(0, n, 8)])
    got = class1_margin(out)
    assert fake.exact_calls[0] == list(range(8))  # the first batch is measured in full
    np.testing.assert_allclose(check.errors[:8], error[:8], atol=1e-5)  # measured on the first batch, signed
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
    measured = error[sorted(rechecked)]
    assert stats['error_range'] == pytest.approx(list(error_range(measured, 2.0)), rel=1e-4, abs=1e-6)


def test_cascade_settles_planted_near_threshold_patches_in_float32(clock: _Clock) -> None:
    """int8 -> bf16 -> float32: each stage only sees what the one before could not decide, float32 the rest."""
    rng = np.random.default_rng(1)
    n = 320
    margins = rng.normal(0, 6, n)
    int8_err = rng.uniform(-0.8, 0.8, n)
    bf16_err = rng.uniform(-0.1, 0.1, n)
    int8_err[:8], bf16_err[:8] = np.linspace(-0.8, 0.8, 8), np.linspace(-0.1, 0.1, 8)  # the first batch: both stages
    planted = [50, 51, 52]
    margins[planted] = [0.05, -0.05, 0.5]  # near the 0.5 threshold (margin 0)
    int8_err[planted] = [-0.3, 0.3, -0.7]  # int8 flips all three; bf16 only gets 0.5 right
    bf16_err[planted] = [-0.09, 0.09, 0.05]
    calls: dict[str, list[list[int]]] = {'int8': [], 'bf16': [], 'exact': []}
    stages = [_TableRunner('int8', margins, int8_err, calls['int8'], clock, 1.0),
              _TableRunner('bf16', margins, bf16_err, calls['bf16'], clock, 2.0)]  # int8 twice as fast
    exact = _TableRunner('exact', margins, np.zeros(n), calls['exact'])
    check = DecisionCheck(stages, exact, thresholds=(0.5,), safety=2.0, name='cascade')
    assert check.spec.backend == 'cascade' and check.spec.extra['stages'] == ['int8', 'bf16']
    x = _indexed(n)
    out = class1_margin(np.concatenate([check.logits(x[s:s + 8]) for s in range(0, n, 8)]))
    assert ((out >= 0) == (margins >= 0)).all()  # every decision is float32's
    assert ((margins + int8_err >= 0) != (margins >= 0)).sum() >= 3  # which int8 alone gets wrong
    to_bf16 = {i for c in calls['bf16'] for i in c}
    to_exact = {i for c in calls['exact'] for i in c}
    assert set(planted) <= to_bf16 and to_exact <= to_bf16  # float32 sees only what bf16 could not decide
    assert {50, 51} <= to_exact and 52 not in to_exact  # bf16 decides 52 (margin 0.55, its bound about 0.2)
    assert len(to_bf16) < n // 2 and len(to_exact - set(range(8))) < len(to_bf16 - set(range(8)))
    np.testing.assert_allclose(out[[50, 51]], margins[[50, 51]], atol=1e-5)  # settled in float32
    assert out[52] == pytest.approx(0.55, abs=1e-5)  # bf16's logits kept
    stats = check.stats()
    assert [s['backend'] for s in stats['stages']] == ['int8', 'bf16']
    assert stats['stages'][0]['passed_on'] == len([i for c in calls['bf16'] for i in c])
    assert stats['rechecked'] == stats['stages'][1]['passed_on'] == len([i for c in calls['exact'] for i in c])
    (lo0, hi0), (lo1, hi1) = check.stage_range(0), check.stage_range(1)
    assert lo0 < lo1 < hi1 < hi0 and check.error_range == (lo0, hi0)
    assert stats['stages'][0]['dropped_after'] is None and stats['stages'][0]['seen'] == n  # int8 pays: kept


def test_cascade_drops_a_stage_that_costs_more_than_it_saves(clock: _Clock) -> None:
    """An int8 stage that quantised badly passes nearly everything on: once measured it is dropped, bf16 goes on
    alone, and every decision is still float32's."""
    rng = np.random.default_rng(2)
    n, batch = 640, 16
    margins = rng.normal(0, 2, n)
    int8_err = rng.uniform(-6, 6, n)  # wider than most margins: int8 can decide little
    bf16_err = rng.uniform(-0.05, 0.05, n)
    calls: dict[str, list[list[int]]] = {'int8': [], 'bf16': [], 'exact': []}
    stages = [_TableRunner('int8', margins, int8_err, calls['int8'], clock, 1.0),
              _TableRunner('bf16', margins, bf16_err, calls['bf16'], clock, 2.0)]
    check = DecisionCheck(stages, _TableRunner('exact', margins, np.zeros(n), calls['exact']), thresholds=(0.5,),
                          safety=2.0, batch_size=batch, name='cascade')
    out = class1_margin(check.logits(_indexed(n)))
    assert ((out >= 0) == (margins >= 0)).all()
    stats = check.stats()['stages']
    when = stats[0]['dropped_after']
    assert when == batch + check_mod.DROP_AFTER  # judged after DROP_AFTER patches beyond the warm-up (one batch)
    assert stats[0]['seen'] == when and max(i for c in calls['int8'] for i in c) == when - 1  # no int8 after it
    assert stats[0]['passed_on'] / stats[0]['seen'] > 0.5 and stats[1]['dropped_after'] is None
    assert [i for c in calls['bf16'] for i in c][-(n - when):] == list(range(when, n))  # bf16 scores the rest
    assert check.error_range == check.stage_range(0)  # int8's range still bounds the patches it scored

    good = DecisionCheck([_TableRunner('int8', margins, bf16_err, None, clock, 1.0),
                          _TableRunner('bf16', margins, bf16_err, None, clock, 2.0)],
                         _TableRunner('exact', margins, np.zeros(n)), thresholds=(0.5,), batch_size=batch)
    good.logits(_indexed(n))
    assert good.stats()['stages'][0]['dropped_after'] is None  # the same costs, few patches passed on: kept


def test_decision_check_bound_grows_with_what_it_sees() -> None:
    margins = np.array([5.0] * 8 + [0.3] * 4 + [0.01] * 12)
    error = np.concatenate([np.linspace(-0.01, 0.01, 8), [-0.2] * 4, [0.5] * 12])  # later errors exceed the first
    fake = _Fake(margins, error)
    check = DecisionCheck(fake.fast, fake.exact, thresholds=(0.5,), safety=4.0)
    x = _indexed(24)
    check.logits(x[:8])
    assert check.error_range == pytest.approx((-0.03, 0.03), rel=1e-3)  # 3 x the largest deviation (0.01)
    out = check.logits(x[8:12])  # fast margins 0.1: outside the range of +-0.03, kept (and wrong by 0.2, not flipped)
    np.testing.assert_allclose(class1_margin(out), 0.1, atol=1e-5)
    out = check.logits(x[12:16])  # fast margins 0.51: far outside, and flipped: an error the warm-up did not warn of
    assert (class1_margin(out) > 0).all() and check.rechecked == 8


def test_identical_measurements_draw_no_range() -> None:
    """A warm-up on identical patches (a blank batch) measures one error 64 times: no range until errors differ."""
    assert error_range(np.full(64, 0.01), 12.0) == (float('-inf'), float('inf'))
    margins = np.concatenate([np.full(64, 3.0), np.linspace(-4, 4, 64)])
    error = np.concatenate([np.full(64, 0.01), np.random.default_rng(0).uniform(-0.05, 0.05, 64)])
    fake = _Fake(margins, error)
    check = DecisionCheck(fake.fast, fake.exact, thresholds=(0.5,))
    x = _indexed(128)
    check.logits(x[:64])  # the blank warm-up
    out = check.logits(x[64:])  # every patch re-run: nothing measured said how far bf16 may be off
    assert check.rechecked == 128 and check.error_range[0] < 0 < check.error_range[1]
    np.testing.assert_allclose(class1_margin(out), margins[64:], atol=1e-5)


def test_decision_check_keeps_a_bounded_history(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check_mod, 'ERROR_HISTORY', 6)
    margins = np.zeros(20)  # every patch sits on the threshold: all are re-checked
    error = np.linspace(0.01, 0.2, 20)
    error[0] = 1.0
    fake = _Fake(margins, error)
    check = DecisionCheck(fake.fast, fake.exact, thresholds=(0.5,), safety=100.0)
    x = _indexed(20)
    for s in range(0, 20, 4):
        check.logits(x[s:s + 4])
    assert check.rechecked == 20 and len(check.errors) == 6
    np.testing.assert_allclose(check.errors, error[-6:], rtol=1e-5)  # the most recent measurements
    assert check.stats()['margin_error_max'] == pytest.approx(1.0, rel=1e-5)  # the largest ever is still reported
    assert check.error_range == pytest.approx(error_range(error[-6:], 100.0), rel=1e-4)
    with pytest.raises(ValueError, match='strictly between 0 and 1'):
        DecisionCheck(fake.fast, fake.exact, thresholds=(1.0,))
    with pytest.raises(ValueError, match='safety must be at least 1'):
        DecisionCheck(fake.fast, fake.exact, thresholds=(0.5,), safety=0.5)


def test_bf16_checked_matches_float32_decisions(model: nn.Module, reference: np.ndarray, data) -> None:
    fp32 = class1_margin(reference)
    later = np.sort(fp32[8:])  # a threshold between two patches of the later batches, so some are in doubt
    middle = (later[len(later) // 2 - 1] + later[len(later) // 2]) / 2
    thresholds = (0.5, float(1 / (1 + np.exp(-middle))))
    runner = create_runner(model, 'bf16_checked', batch_size=8, thresholds=thresholds)
    assert (runner.spec.backend, runner.spec.precision, runner.spec.extra['checked_by']) == \
        ('bf16_checked', 'bf16', 'channels_last')
    logits = runner.logits(data[0])  # one call of 32: checked in batches of 8, the first one in full
    for t in thresholds:
        assert ((class1_margin(logits) >= np.log(t / (1 - t))) == (fp32 >= np.log(t / (1 - t)))).all()
    info = runner.stats()
    assert info['patches'] == N and 8 <= info['rechecked'] <= N and info['margin_error_abs_median'] > 0
    plain = create_runner(model, 'bf16', batch_size=8).logits(data[0])
    exact = create_runner(model, 'channels_last', batch_size=8).logits(data[0])
    kept = np.abs(logits - plain).max(axis=1) == 0  # not re-checked: the bf16 logits as they came
    assert 0 < kept.sum() < N - 8, 'the first batch is re-checked in full, and not every patch after it'
    np.testing.assert_allclose(logits[~kept], exact[~kept], rtol=1e-4, atol=1e-4)  # the others: float32's
    assert kept.sum() + info['rechecked'] == N
    with pytest.raises(ValueError, match='checks binary decisions'):
        create_runner(timm.create_model('inception_v4_pcam', depths=(1, 1, 1), num_classes=3), 'bf16_checked')


def test_plans_go_to_the_tensorrt_runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import timm_inception_pcam.inference.trt_runner as trt_runner

    plan = tmp_path / 'model.plan'
    with pytest.raises(UsageError, match='runs on an NVIDIA GPU: use device cuda'):
        create_runner(plan, device='cpu')
    with pytest.raises(CheckpointError, match='model.plan: no such TensorRT plan'):
        create_runner(plan, device='auto')
    plan.write_bytes(b'engine')
    opened = []

    class FakeTrt(_TableRunner):
        def __init__(self, path: Path):
            opened.append(path)
            super().__init__('tensorrt', np.zeros(1), np.zeros(1))

    monkeypatch.setattr(trt_runner, 'TrtRunner', FakeTrt)
    runner = create_runner(plan, device='auto')
    assert isinstance(runner, FakeTrt) and opened == [plan]
    with pytest.raises(UsageError, match='runs at precision fp32, but fp16 was asked'):
        create_runner(plan, device='cuda', precision='fp16')
