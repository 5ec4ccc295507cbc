"""The evaluator end to end on a tiny synthetic PCam set with a reduced-depth Inception-v4, and its bad inputs."""
import csv
import errno
import json
import math
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from timm_inception_pcam import evaluate
from timm_inception_pcam.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint
from timm_inception_pcam.constants import PCAM_MEAN, PCAM_STD
from timm_inception_pcam.data import PCamDataset, dihedral, synthesize_pcam
from timm_inception_pcam.errors import InferenceError, UsageError, cli
from timm_inception_pcam.inference import Runner, RunnerSpec, create_runner
from timm_inception_pcam.inference.check import DecisionCheck, Settler
from timm_inception_pcam.inference.tta import view_probabilities
from timm_inception_pcam.metrics import compute_metrics, select_threshold
from timm_inception_pcam.preprocess import model_normalization, preprocess_patches
from timm_inception_pcam.storage import file_sha256

TINY = {'depths': (1, 1, 1)}
N_VALID, N_TEST, BATCH = 6, 6, 4  # two batches per split, the last one ragged


@pytest.fixture(scope='module', autouse=True)
def _one_torch_thread():
    """Intra-op threads spin against each other when the 2 cores are shared (10x slower measured): use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def pcam_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('pcam')
    synthesize_pcam(root, n=16, seed=0, n_valid=N_VALID, n_test=N_TEST)
    return root


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory, pcam_dir):
    """A reduced-depth Inception-v4 whose BatchNorm statistics were gathered on the synthetic patches.

    Random weights with default BN statistics give almost constant outputs; warmed-up statistics make the
    probabilities vary from patch to patch, so the threshold and metrics checks below mean something.
    """
    torch.manual_seed(0)
    model = timm.create_model('inception_v4_pcam', num_classes=2, **TINY)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the warm-up batches
    patches, _ = PCamDataset(pcam_dir, 'train').read_batch(np.arange(16))
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(preprocess_patches(patches, PCAM_MEAN, PCAM_STD)))
    path = tmp_path_factory.mktemp('ckpt') / 'tiny.pth.tar'
    save_checkpoint(path, model.eval(), arch='inception_v4_pcam', model_kwargs=TINY)
    return path


class PositionNet(torch.nn.Module):
    """Logit of class 1 = a position-weighted mean of the first channel: every dihedral view gives another value."""

    def __init__(self, num_classes: int = 2):
        super().__init__()
        h = torch.arange(96, dtype=torch.float32)
        self.register_buffer('weight', (h[:, None] + 3 * h[None, :] + 1) / (96 * 96 * 200))
        self.num_classes = num_classes
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.clone())
        score = (x[:, 0] * self.weight).sum(dim=(1, 2))
        return torch.stack([-score] + [score] * (self.num_classes - 1), dim=1)


def _patches(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 96, 96, 3), dtype=np.uint8)


def _eager(model: torch.nn.Module) -> Runner:
    return create_runner(model, 'eager', batch_size=64)


def test_view_probabilities_averages_dihedral_views():
    patches, model = _patches(10), PositionNet()
    views = view_probabilities(_eager(model), patches, batch_size=4, tta=8, progress=False)
    assert views.shape == (8, 10)
    assert len(model.calls) == 8 * 3 and sum(c.shape[0] for c in model.calls) == 8 * 10  # 3 batches x 8 views
    x = torch.from_numpy(preprocess_patches(patches, PCAM_MEAN, PCAM_STD))
    with torch.no_grad():
        np.testing.assert_allclose(views[0], torch.softmax(model(x), 1)[:, 1].numpy(), rtol=1e-6)  # view 0: as stored
        for k in range(8):
            expected = torch.softmax(model(dihedral(x, k)), 1)[:, 1].numpy()
            np.testing.assert_allclose(views[k], expected, rtol=1e-6)
    assert np.unique(views[:, 0].round(9)).size == 8  # eight different views, not one view eight times
    model.calls.clear()
    again = view_probabilities(_eager(model), patches, batch_size=4, tta=8, progress=False)
    np.testing.assert_allclose(again.mean(axis=0), views.mean(axis=0))
    model.calls.clear()
    plain = view_probabilities(_eager(model), patches, batch_size=32, tta=1, progress=False)
    assert len(model.calls) == 1 and plain.shape == (1, 10)
    np.testing.assert_allclose(plain[0], views[0], rtol=1e-6)


class NumpyRunner:
    """Any engine with the Runner protocol (uint8 NHWC in, logits out) can be evaluated with TTA."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.seen = model, []
        self.spec = RunnerSpec(backend='numpy', precision='fp32', source='test')

    def logits(self, patches: np.ndarray) -> np.ndarray:
        self.seen.append(patches.dtype)
        with torch.no_grad():
            return self.model(torch.from_numpy(preprocess_patches(patches, PCAM_MEAN, PCAM_STD))).numpy()

    def close(self) -> None:
        pass


def test_view_probabilities_runner_is_swappable():
    patches, model = _patches(6, seed=1), PositionNet()
    ref = view_probabilities(_eager(model), patches, batch_size=4, tta=2, progress=False)
    runner = NumpyRunner(model)
    assert isinstance(runner, Runner)
    got = view_probabilities(runner, patches, batch_size=4, tta=2, progress=False)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert runner.seen == [np.dtype(np.uint8)] * 4  # 2 batches x 2 views, raw patches


def test_view_probabilities_bad_input():
    with pytest.raises(UsageError, match='tta must be between 1 and 8'):
        view_probabilities(_eager(PositionNet()), _patches(2), tta=9)
    with pytest.raises(InferenceError, match=r'logits of shape \(2, 3\).*expected \(2, 2\)'):
        view_probabilities(_eager(PositionNet(num_classes=3)), _patches(2), progress=False)
    with pytest.raises(ValueError, match='uint8'):
        view_probabilities(_eager(PositionNet()), _patches(2).astype(np.float32), progress=False)


def test_normalization_follows_pretrained_cfg():
    assert model_normalization(timm.create_model('inception_v4_pcam', **TINY)) == (PCAM_MEAN, PCAM_STD)
    resnet = timm.create_model('resnet10t', num_classes=2)
    assert model_normalization(resnet) == (resnet.pretrained_cfg['mean'], resnet.pretrained_cfg['std'])
    assert model_normalization(PositionNet()) == (PCAM_MEAN, PCAM_STD)  # no pretrained_cfg


def _only_split(pcam_dir, folder, split: str):
    """A copy of the synthetic PCam folder holding only the files of `split`."""
    folder.mkdir()
    for p in pcam_dir.iterdir():
        if f'_{split}_' in p.name:
            shutil.copy(p, folder / p.name)
    return folder


def _args(pcam_dir, checkpoint, out, *extra: str) -> list[str]:
    return ['--checkpoint', str(checkpoint), '--data-dir', str(pcam_dir), '--output', str(out), '--workers', '0',
            '--batch-size', str(BATCH), '--bootstrap', '200', '--device', 'cpu', *extra]


def test_evaluate_tta_threshold_from_valid(pcam_dir, checkpoint, tmp_path, monkeypatch, capsys):
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, logits) of every forward pass, in order

    def recording_load_model(*args, **kwargs):
        model = load_model(*args, **kwargs)
        model.register_forward_hook(lambda m, inp, out: calls.append((inp[0].clone(), out.detach().clone())))
        return model

    monkeypatch.setattr(evaluate, 'load_model', recording_load_model)
    out = tmp_path / 'eval'
    # the exact fp32 path, so the recorded logits are the ones the evaluator turned into probabilities
    report = evaluate.main(_args(pcam_dir, checkpoint, out, '--split', 'test', '--tta', '8', '--backend', 'eager'))
    assert report['backend'] == 'eager'

    batches = math.ceil(N_TEST / BATCH)  # per split: test first, then valid for the threshold
    assert len(calls) == 8 * 2 * batches and sum(x.shape[0] for x, _ in calls) == 8 * (N_TEST + N_VALID)
    first = calls[0][0]
    assert all(not torch.equal(first, x) for x, _ in calls[1:8])  # 8 different views of the first batch

    assert json.loads((out / 'report.json').read_text()) == report
    assert report['format'] == 'timm-inception-pcam-report/1'
    assert (report['model'], report['split'], report['n'], report['tta']) == ('inception_v4_pcam', 'test', N_TEST, 8)
    assert report['checkpoint'] == str(checkpoint) and report['checkpoint_sha256'] == file_sha256(checkpoint)

    # the threshold is the one Youden's J picks on valid (TTA-averaged), recomputed here from the recorded logits:
    # calls are batch by batch, the 8 views of each batch in a row
    valid = PCamDataset(pcam_dir, 'valid')
    valid_calls = calls[8 * batches:]
    valid_logits = torch.cat([torch.stack([out for _, out in valid_calls[8 * b:8 * b + 8]]) for b in range(batches)],
                             dim=1)  # (8 views, N_VALID, 2)
    valid_views = torch.softmax(valid_logits, -1)[..., 1].double().numpy()
    valid_probs = valid_views.mean(axis=0)
    assert valid_probs.std() > 1e-4  # outputs vary, so the choice of threshold is not trivial
    assert report['threshold']['source'] == 'valid' and report['threshold']['method'] == 'youden'
    assert report['threshold']['value'] == pytest.approx(select_threshold(valid.labels, valid_probs), abs=1e-6)

    with open(out / 'predictions.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    labels = np.array([int(r['label']) for r in rows])
    probs = np.array([float(r['prob']) for r in rows])
    np.testing.assert_array_equal(labels, PCamDataset(pcam_dir, 'test').labels)
    assert all(int(r['pred']) == int(float(r['prob']) >= report['threshold']['value']) for r in rows)
    expected = compute_metrics(labels, probs, report['threshold']['value'])
    for k in ('tp', 'fp', 'tn', 'fn'):
        assert report['metrics'][k] == expected[k]
    for k in ('accuracy', 'roc_auc', 'f1', 'weighted_f1', 'precision', 'recall', 'balanced_accuracy',
              'average_precision', 'nll', 'ece', 'tpr', 'fpr'):  # the file's probabilities are the report's exactly
        assert report['metrics'][k] == pytest.approx(expected[k], abs=1e-12, rel=1e-9, nan_ok=True) or (
            report['metrics'][k] is None and math.isnan(expected[k]))
    for k in ('roc_auc', 'accuracy', 'f1'):
        lo, hi = report['ci95'][k]
        if lo is not None:
            assert lo <= hi

    gain = report['tta_gain']
    plain = np.array([float(r['prob_no_tta']) for r in rows])
    assert not np.allclose(plain, probs)
    plain_threshold = select_threshold(valid.labels, valid_views[0])  # the plain view gets its own valid threshold
    assert gain['without_tta_threshold'] == pytest.approx(plain_threshold, abs=1e-6)
    assert gain['without_tta']['accuracy'] == pytest.approx(float(np.mean((plain >= plain_threshold) == labels)))
    assert gain['delta']['accuracy'] == pytest.approx(report['metrics']['accuracy'] - gain['without_tta']['accuracy'])
    assert gain['delta']['roc_auc'] == pytest.approx(report['metrics']['roc_auc'] - gain['without_tta']['roc_auc'])

    assert report['plots'] == {'roc': 'roc.png', 'pr': 'pr.png', 'confusion': 'confusion.png'}
    for name in report['plots'].values():
        with Image.open(out / name) as im:
            assert im.format == 'PNG' and im.size[0] > 200
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(['report.json', 'predictions.csv', *report['plots'].values()])  # no temporary files
    assert len(report['curves']['roc']['fpr']) >= 2
    printed = capsys.readouterr().out
    assert 'roc_auc' in printed and printed.strip().splitlines()[-1].startswith('evaluate: inception_v4_pcam on test')


def test_evaluate_without_valid_uses_default_threshold(pcam_dir, checkpoint, tmp_path):
    data = _only_split(pcam_dir, tmp_path / 'no_valid', 'test')
    with pytest.warns(UserWarning, match='no valid split'):
        report = evaluate.main(_args(data, checkpoint, tmp_path / 'eval'))
    assert report['threshold']['value'] == 0.5 and report['threshold']['source'] == 'default'
    assert report['threshold']['fallback'].startswith('no valid split to choose the threshold on')
    assert report['tta'] == 1 and report['tta_gain'] is None and report['n'] == N_TEST
    explicit = evaluate.main(_args(pcam_dir, checkpoint, tmp_path / 'eval2', '--threshold-from', 'default'))
    assert 'fallback' not in explicit['threshold']  # asked for: not a fallback


def test_a_valid_split_missing_one_file_is_an_error(pcam_dir, checkpoint, tmp_path, capsys):
    """valid_x without valid_y: one line naming the file (it was taken as 'no valid split' and 0.5, silently)."""
    data = _only_split(pcam_dir, tmp_path / 'half_valid', 'test')
    x = next(p for p in pcam_dir.iterdir() if '_valid_x' in p.name)
    shutil.copy(x, data / x.name)
    assert cli(evaluate.main, 'evaluate', _args(data, checkpoint, tmp_path / 'eval')) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'split_valid_y.h5: PCam file not found' in err
    assert 'the valid split is incomplete' in err and '--threshold-from default' in err
    assert not (tmp_path / 'eval').exists()


def test_non_finite_model_outputs_are_one_line(pcam_dir, checkpoint, tmp_path, capsys):
    ckpt = read_checkpoint(checkpoint)
    bias = next(k for k in ckpt['state_dict'] if k.endswith('last_linear.bias'))
    ckpt['state_dict'][bias] = torch.tensor([float('nan'), 0.0])
    broken = tmp_path / 'nan.pth'
    torch.save(ckpt, broken)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        assert cli(evaluate.main, 'evaluate', _args(pcam_dir, broken, tmp_path / 'eval', '--backend', 'eager')) == 2
    assert not [w for w in record if 'threshold' in str(w.message)]  # not blamed on the valid split
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{broken}: the model's outputs are not finite (NaN or inf) for " \
        f'{N_TEST} of {N_TEST} test patches (first: patch 0)' in err
    assert not (tmp_path / 'eval').exists()


def test_one_class_in_the_labels_gives_no_curves(pcam_dir, checkpoint, tmp_path):
    report = evaluate.main(_args(pcam_dir, checkpoint, tmp_path / 'eval', '--limit', '1'))
    assert report['n'] == 1 and report['metrics']['roc_auc'] is None
    assert report['curves']['roc'] is None  # undefined, not a curve of NaNs or of sklearn's conventions
    assert (report['curves']['pr'] is None) == (PCamDataset(pcam_dir, 'test').labels[0] == 0)


def test_evaluate_valid_split_predicts_once(pcam_dir, checkpoint, tmp_path, monkeypatch):
    seen: list[int] = []

    def counting_load_model(*args, **kwargs):
        model = load_model(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
        return model

    monkeypatch.setattr(evaluate, 'load_model', counting_load_model)
    report = evaluate.main(_args(pcam_dir, checkpoint, tmp_path / 'eval', '--split', 'val', '--threshold-method', 'f1',
                                 '--backend', 'channels_last'))  # one forward per batch (bf16_checked adds some)
    assert report['split'] == 'valid' and report['n'] == N_VALID
    assert sum(seen) == N_VALID  # the valid predictions serve both the threshold and the metrics
    assert report['threshold']['source'] == 'valid' and report['threshold']['method'] == 'f1'
    assert report['threshold']['valid_n'] == N_VALID


class _ScoreRunner:
    """A bf16_checked stand-in: exact = a position-weighted score, fast = that plus a patch-dependent error (`error`
    x 20 at most: 0.05 -> 0.1), each patch it scores counted in `seen`."""

    def __init__(self, error: float, backend: str | None = None):
        self.net, self.error, self.seen = PositionNet().eval(), error, 0
        self.spec = RunnerSpec(backend=backend or ('fast' if error else 'exact'), precision='fp32', source='test')

    def logits(self, patches: np.ndarray) -> np.ndarray:
        self.seen += len(patches)
        x = torch.from_numpy(preprocess_patches(patches, PCAM_MEAN, PCAM_STD))
        with torch.no_grad():  # margins about -14..10 on these random patches
            logits = 150 * self.net(x).numpy() + np.array([0.0, 243.75], dtype=np.float32)
        if self.error:  # margin error depending only on the patch
            logits[:, 1] += (self.error * x[:, 1, 0, 0].numpy()).astype(np.float32)
        return logits

    def close(self) -> None:
        pass


def _checked_views(n: int, tta: int):
    patches = _patches(n, seed=3)
    check = DecisionCheck(_ScoreRunner(0.05), _ScoreRunner(0.0), thresholds=())
    views = view_probabilities(check, patches, batch_size=8, tta=tta, progress=False)
    reference = view_probabilities(check.exact, patches, batch_size=8, tta=tta, progress=False)
    assert check.rechecked == 8  # the first batch, once
    return Settler(check, patches, views, 8), views, reference


def test_settler_recomputes_the_decisions_in_doubt():
    settler, views, reference = _checked_views(40, tta=2)
    k = 20  # a threshold between patch k's float32 and fast probabilities: the fast path alone decides it wrongly
    threshold = float((reference[:, k].mean() + views[:, k].mean()) / 2)
    assert ((views.mean(axis=0) >= threshold) != (reference.mean(axis=0) >= threshold))[k]
    assert 0 < settler.at(threshold) == settler.settled < 40
    np.testing.assert_array_equal(views.mean(axis=0) >= threshold, reference.mean(axis=0) >= threshold)
    np.testing.assert_allclose(views[:, settler.exact], reference[:, settler.exact], rtol=1e-6)
    assert not np.allclose(views[:, ~settler.exact], reference[:, ~settler.exact])  # the others keep fast values
    assert settler.at(threshold) == 0  # nothing is settled twice


def test_settler_goes_through_the_cascade_stages(monkeypatch):
    """int8 views in doubt are re-scored in bf16 first; only those bf16 leaves in doubt go on to float32."""
    from timm_inception_pcam.inference import check as check_mod

    monkeypatch.setattr(check_mod, 'DROP_AFTER', 10 ** 6)  # these stand-ins cost the same: int8 must not be dropped
    patches = _patches(400, seed=3)
    int8, bf16, exact = _ScoreRunner(0.05, 'int8'), _ScoreRunner(0.005, 'bf16'), _ScoreRunner(0.0)
    check = DecisionCheck([int8, bf16], exact, thresholds=())
    views = view_probabilities(check, patches, batch_size=8, tta=1, progress=False)
    reference = view_probabilities(_ScoreRunner(0.0), patches, batch_size=8, tta=1, progress=False)
    assert int8.seen == 400 and bf16.seen == exact.seen == 8  # the warm-up batch only
    settler = Settler(check, patches, views, 8)
    rng = np.random.default_rng(0)
    labels = (reference[0] + rng.normal(0, 0.1, 400) > np.median(reference[0])).astype(np.int64)
    assert settler.choose(labels, 'f1') == pytest.approx(select_threshold(labels, reference[0], 'f1'), abs=1e-9)
    threshold = float(np.median(reference[0]))
    settler.at(threshold)
    np.testing.assert_array_equal(views[0] >= threshold, reference[0] >= threshold)
    rescored, settled = settler.rescored[1], settler.settled
    assert bf16.seen - 8 == rescored and exact.seen - 8 == settled  # each patch re-run once per stage at most
    assert 0 < settled < rescored < 400 // 2  # bf16 decided most of what int8 could not
    np.testing.assert_allclose(views[:, settler.exact], reference[:, settler.exact], rtol=1e-6)


@pytest.mark.parametrize('method', ['youden', 'f1'])
def test_settler_chooses_the_float32_threshold(method):
    settler, views, reference = _checked_views(400, tta=1)
    rng = np.random.default_rng(0)
    labels = (reference[0] + rng.normal(0, 0.1, 400) > np.median(reference[0])).astype(np.int64)
    fast_choice = select_threshold(labels, views[0], method)
    float32_choice = select_threshold(labels, reference[0], method)
    assert fast_choice != float32_choice  # the case that matters: bf16 alone would choose another threshold
    assert settler.choose(labels, method) == pytest.approx(float32_choice, abs=1e-9)
    assert 0 < settler.settled < 400 // 2, 'only the patches that could change the choice'


def test_evaluate_bf16_checked_counts_float32_decisions(pcam_dir, checkpoint, tmp_path):
    exact = evaluate.main(_args(pcam_dir, checkpoint, tmp_path / 'fp32', '--tta', '2', '--backend', 'channels_last'))
    report = evaluate.main(_args(pcam_dir, checkpoint, tmp_path / 'checked', '--tta', '2',
                                 '--backend', 'bf16_checked'))
    assert exact['backend_check'] is None
    check = report['backend_check']
    assert report['backend'] == 'bf16_checked' and check['settled_at'] == report['threshold']['value']
    assert check['margin_error_max'] > 0 and check['rechecked'] >= BATCH

    def probs(folder) -> np.ndarray:
        with open(folder / 'predictions.csv', newline='') as f:
            return np.array([float(r['prob']) for r in csv.DictReader(f)])

    t = report['threshold']['value']
    np.testing.assert_array_equal(probs(tmp_path / 'checked') >= t, probs(tmp_path / 'fp32') >= t)
    # every settled patch carries float32's probability (the printed 6 decimals), so at most that many agree
    same = int((np.abs(probs(tmp_path / 'checked') - probs(tmp_path / 'fp32')) <= 2e-6).sum())
    assert check['settled'] <= same
    # the valid patches around the chosen threshold were settled too, so it is float32's own choice
    assert check['valid_settled'] >= 1 and 'valid_settled' not in report['threshold']
    assert t == pytest.approx(exact['threshold']['value'], abs=1e-6)
    assert report['metrics']['roc_auc'] == pytest.approx(exact['metrics']['roc_auc'], abs=0.05)


def test_evaluate_auto_is_never_the_int8_cascade(pcam_dir, checkpoint, tmp_path, monkeypatch):
    """Elsewhere `auto` runs the cascade once a model's int8 is cached; the evaluator's figures would carry int8's
    unbounded probability error, so its `auto` stays bf16 checked (the cascade only when asked)."""
    from timm_inception_pcam.inference import create_runner, factory

    monkeypatch.setenv('TIMM_INCEPTION_PCAM_OPENVINO_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(factory, 'cpu_has_native_bf16', lambda: True)
    model = load_model(None, checkpoint)
    create_runner(model, 'openvino_int8', batch_size=BATCH).close()  # its int8 is cached now
    assert factory.auto_backend(model) == 'openvino_cascade'
    report = evaluate.main(_args(pcam_dir, checkpoint, tmp_path / 'auto'))
    assert report['backend'] == 'openvino_bf16_checked'
    asked = evaluate.main(_args(pcam_dir, checkpoint, tmp_path / 'cascade', '--backend', 'openvino_cascade'))
    assert asked['backend'] == 'openvino_cascade' and set(asked['backend_check']['rescored']) == {'openvino_bf16'}
    assert asked['threshold']['value'] == pytest.approx(report['threshold']['value'], abs=1e-6)
    assert all(asked['metrics'][k] == report['metrics'][k] for k in ('tp', 'fp', 'tn', 'fn'))


def test_missing_split_file_is_named(pcam_dir, checkpoint, tmp_path):
    data = _only_split(pcam_dir, tmp_path / 'only_valid', 'valid')
    with pytest.raises((FileNotFoundError, ValueError), match='camelyonpatch_level_2_split_test'):
        evaluate.main(_args(data, checkpoint, tmp_path / 'eval'))
    assert not (tmp_path / 'eval').exists()


@pytest.fixture(scope='module')
def three_class_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp('ckpt3') / 'three.pth.tar'
    save_checkpoint(path, timm.create_model('inception_v4_pcam', num_classes=3, **TINY), arch='inception_v4_pcam',
                    model_kwargs=TINY)
    return path


@pytest.mark.parametrize('case, match', [
    ('unknown_model', "unknown model 'no_such_model'"),
    ('other_arch', "weights of 'inception_v4_pcam' do not fit inception_resnet_v2_pcam"),
    ('three_classes', '3 classes, expected 2'),
    ('corrupt', 'cannot load'),
    ('other_depths', r'tensors of other shapes \(e\.g\. features\.'),
    ('unknown_kwarg', "model argument bogus=1: inception_v4_pcam does not take 'bogus'"),
])
def test_bad_checkpoints_surface_cleanly(case, match, pcam_dir, checkpoint, three_class_checkpoint, tmp_path,
                                         capsys):
    ckpt, extra = checkpoint, []
    if case == 'unknown_model':
        extra = ['--model', 'no_such_model']
    elif case == 'other_arch':
        extra = ['--model', 'inception_resnet_v2_pcam']
    elif case == 'three_classes':
        ckpt = three_class_checkpoint
    elif case in ('other_depths', 'unknown_kwarg'):
        extra = ['--model-kwargs', 'depths=2,2,2' if case == 'other_depths' else 'bogus=1']
    else:
        ckpt = tmp_path / 'corrupt.pth.tar'
        ckpt.write_bytes(checkpoint.read_bytes()[:5000])  # truncated
    argv = _args(pcam_dir, ckpt, tmp_path / 'eval', *extra)
    with pytest.raises(UsageError if case == 'unknown_kwarg' else CheckpointError, match=match) as info:
        evaluate.main(argv)
    if case not in ('unknown_model', 'unknown_kwarg'):
        assert str(ckpt) in str(info.value)
    assert 'weights_only' not in str(info.value)  # torch's advice to load unsafely is not passed on
    assert cli(evaluate.main, 'evaluate', argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('evaluate: error:') and len(err.splitlines()) == 1 and 'Traceback' not in err
    assert not (tmp_path / 'eval').exists()


@pytest.mark.parametrize('extra, message', [
    (['--seed', '-1'], '--seed must be >= 0 and <= 4294967295, got -1'),
    (['--workers', '100000'], '--workers must be >= 0 and <= 256, got 100000'),
    (['--model-kwargs', 'foo'], "--model-kwargs 'foo': expected KEY=VALUE"),
])
def test_bad_options_are_one_line_before_any_work(extra, message, pcam_dir, checkpoint, tmp_path, capsys):
    try:
        status = cli(evaluate.main, 'evaluate', _args(pcam_dir, checkpoint, tmp_path / 'eval', *extra))
    except SystemExit as e:  # argparse's own usage error
        status = e.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert message in err.splitlines()[-1] and 'Traceback' not in err
    assert not (tmp_path / 'eval').exists()


def test_load_model_names_what_is_missing(tmp_path):
    with pytest.raises(UsageError, match='no model given: pass --model, --checkpoint, or both'):
        load_model(None, None)
    with pytest.raises(CheckpointError, match=f'{tmp_path}: a folder, expected a checkpoint file'):
        load_model(None, tmp_path)
    with pytest.raises(CheckpointError, match='none.pth: checkpoint file not found'):
        load_model(None, tmp_path / 'none.pth')


@pytest.fixture(scope='module')
def onnx_files(tmp_path_factory, pcam_dir, checkpoint):
    """The checkpoint exported with export.onnx, and its FP16 conversion by export.fp16."""
    from export.fp16 import convert_fp16
    from export.onnx import export_onnx

    folder = tmp_path_factory.mktemp('onnx')
    model = load_model(None, checkpoint)
    fp32 = export_onnx(model, folder / 'tiny.onnx', metadata={'model': 'inception_v4_pcam',
                                                              'checkpoint_sha256': file_sha256(checkpoint)})
    calibration, _ = PCamDataset(pcam_dir, 'train').read_batch(np.arange(8))
    fp16 = folder / 'tiny.fp16.onnx'
    convert_fp16(fp32, fp16, calibration)
    return fp32, fp16


def test_evaluate_scores_onnx_and_fp16_onnx_like_the_checkpoint(pcam_dir, checkpoint, onnx_files, tmp_path):
    reference = evaluate.main(_args(pcam_dir, checkpoint, tmp_path / 'ckpt', '--tta', '2', '--backend', 'eager'))
    assert reference['artefact']['kind'] == 'checkpoint' and reference['artefact']['precision'] == 'fp32'
    for path, precision, tolerance in ((onnx_files[0], 'fp32', 1e-5), (onnx_files[1], 'fp16', 1e-3)):
        report = evaluate.main(_args(pcam_dir, path, tmp_path / precision, '--tta', '2'))
        artefact = report['artefact']
        assert (artefact['path'], artefact['sha256']) == (str(path), file_sha256(path))
        assert (artefact['kind'], artefact['backend'], artefact['precision']) == ('onnx', 'onnxruntime', precision)
        assert artefact['source_checkpoint_sha256'] == file_sha256(checkpoint)
        assert report['backend'] == 'onnxruntime' and report['precision'] == precision
        assert report['model'] == 'inception_v4_pcam' and report['checkpoint_sha256'] == file_sha256(path)
        assert set(report['metrics']) == set(reference['metrics']) and set(report['ci95']) == set(reference['ci95'])
        assert report['n'] == reference['n'] and report['tta_gain'] is not None
        assert report['metrics']['roc_auc'] == pytest.approx(reference['metrics']['roc_auc'], abs=tolerance * 10)
        assert report['threshold']['value'] == pytest.approx(reference['threshold']['value'], abs=tolerance)
        for name in ('predictions.csv', 'report.json', 'roc.png'):
            assert (tmp_path / precision / name).is_file()
    with pytest.raises(UsageError, match='apply to checkpoints, not to an onnx file'):
        evaluate.main(_args(pcam_dir, onnx_files[0], tmp_path / 'ema', '--use-ema'))


def test_precision_option_and_deprecated_amp(pcam_dir, checkpoint):
    def config(*extra: str) -> evaluate.EvalConfig:
        return evaluate.config_from_args(evaluate.build_parser().parse_args(
            ['--checkpoint', str(checkpoint), '--data-dir', str(pcam_dir), *extra]))

    assert config().precision == 'auto'
    assert config('--precision', 'bfloat16').precision == 'bf16'
    with pytest.warns(DeprecationWarning, match='--amp is deprecated'):
        assert config('--amp', 'none').precision == 'fp32'
    with pytest.warns(DeprecationWarning):
        assert config('--amp', 'fp16', '--precision', 'float16').precision == 'fp16'
    with pytest.raises(UsageError, match='--amp bf16 and --precision fp32 disagree'):
        config('--amp', 'bf16', '--precision', 'fp32')
    with pytest.raises(UsageError, match="--precision 'fp8' not supported"):
        config('--precision', 'fp8')
    with pytest.raises(UsageError, match='--batch-size must be >= 1'):
        config('--batch-size', '0')


def test_command_line_user_error_is_one_line(pcam_dir, tmp_path):
    missing = tmp_path / 'missing.pth.tar'
    result = subprocess.run([sys.executable, '-m', 'timm_inception_pcam.evaluate', '--checkpoint', str(missing),
                             '--data-dir', str(pcam_dir), '--output', str(tmp_path / 'eval'), '--workers', '0'],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr
    assert lines[0].startswith('evaluate: error:') and 'missing.pth.tar' in lines[0]
    assert not (tmp_path / 'eval').exists()


def test_a_finished_evaluation_is_replaced_only_when_asked(pcam_dir, checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / 'eval'
    argv = _args(pcam_dir, checkpoint, out, '--backend', 'channels_last', '--limit', '32')
    first = evaluate.main(argv)
    assert cli(evaluate.main, 'evaluate', argv) == 2  # a second run would mix with the first
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'already holds a run (report.json)' in err[0] and '--overwrite' in err[0]
    (out / 'report.json').unlink()  # a run killed before its report: the rest is replaced without asking
    (out / '.predictions.csv.x.partial').write_text('left by a killed run')
    again = evaluate.main(argv)
    assert again['metrics'] == first['metrics'] and not list(out.glob('.*partial*'))
    assert evaluate.main([*argv, '--overwrite'])['metrics'] == first['metrics']
    assert not (out / '.lock').exists()


def test_a_failed_run_leaves_the_previous_one_as_it_was(pcam_dir, checkpoint, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / 'eval'
    argv = _args(pcam_dir, checkpoint, out, '--backend', 'channels_last', '--limit', '32')
    first = evaluate.main(argv)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / '.outputs.x.partial').mkdir()  # a killed run's staging folder
    (out / '.outputs.x.partial' / 'report.json').write_text('{}')

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device', str(out / 'confusion.png'))

    monkeypatch.setattr(evaluate, 'plot_confusion', full_disk)  # after the predictions and two plots are written
    assert cli(evaluate.main, 'evaluate', [*argv, '--overwrite']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'No space left on device' in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing of the failed run is visible

    monkeypatch.undo()
    (out / 'report.json').unlink()
    again = evaluate.main(argv)  # without its report the folder is unfinished: the next run replaces every file
    assert sorted(p.name for p in out.iterdir()) == sorted(evaluate.OUTPUT_NAMES)
    assert again['metrics'] == first['metrics'] == json.loads((out / 'report.json').read_text())['metrics']
