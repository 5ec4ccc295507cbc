"""Auxiliary classifiers in training only: GoogLeNet trained with --aux-weight; its checkpoint evaluates and exports
as a plain classifier."""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from timm_inception_pcam.checkpoint import load_model, model_kwargs_of, read_checkpoint
from timm_inception_pcam.errors import cli
from timm_inception_pcam.models._common import is_aux_key
from timm_inception_pcam.train import TrainConfig, TrainError, main, train
from timm_inception_pcam.train.loop import training_loss


@pytest.fixture(scope='module')
def pcam_dir(tmp_path_factory) -> Path:
    from timm_inception_pcam.data import synthesize_pcam

    root = tmp_path_factory.mktemp('pcam')
    synthesize_pcam(root, 32, seed=5, n_valid=16, n_test=16)
    return root


def _config(data: Path, out: Path, **over) -> TrainConfig:
    return TrainConfig(**{'data_dir': data, 'output': out, 'model': 'googlenet_pcam', 'pretrained': False,
                          'batch_size': 8, 'steps_per_epoch': 2, 'epochs': 1, 'limit_val': 16, 'workers': 0,
                          'warmup_epochs': 0, 'progress': False, 'precision': 'fp32', **over})


def test_aux_loss_adds_weighted_heads() -> None:
    y = torch.tensor([0, 1])
    logits, aux1, aux2 = torch.randn(2, 2), torch.randn(2, 2), torch.randn(2, 2)
    ce = torch.nn.CrossEntropyLoss()
    assert torch.allclose(training_loss((logits, (aux1, aux2)), y, ce, 0.3),
                          ce(logits, y) + 0.3 * (ce(aux1, y) + ce(aux2, y)))
    assert torch.equal(training_loss(logits, y, ce, 0.3), ce(logits, y))


def test_googlenet_trains_with_aux_heads_and_evaluates_and_exports_without(pcam_dir, tmp_path) -> None:
    from export.onnx import export_onnx
    from timm_inception_pcam.evaluate import EvalConfig, evaluate

    result = train(_config(pcam_dir, tmp_path / 'run', aux_weight=0.3))
    last = read_checkpoint(result.last_checkpoint)
    assert any(is_aux_key(k) for k in last['state_dict'])  # trained heads kept for --resume
    assert 'aux_logits' not in model_kwargs_of(last)  # but not part of the architecture that is evaluated
    assert last['train_args']['aux_weight'] == 0.3
    model = load_model(None, result.best_checkpoint or result.last_checkpoint)
    assert not any(is_aux_key(k) for k in model.state_dict())
    model.train()  # even in training mode a model built without aux heads returns plain logits
    assert isinstance(model(torch.randn(2, 3, 96, 96)), torch.Tensor)
    model.eval()
    onnx = export_onnx(model, tmp_path / 'googlenet.onnx')
    report = evaluate(EvalConfig(checkpoint=str(result.last_checkpoint), data_dir=str(pcam_dir), output=str(
        tmp_path / 'eval'), backend='channels_last', workers=0, bootstrap=50).check())
    assert report['n'] == 16 and 0.0 <= report['metrics']['roc_auc'] <= 1.0
    from timm_inception_pcam.inference import create_runner

    x = np.random.default_rng(0).integers(0, 255, (4, 96, 96, 3), dtype=np.uint8)
    np.testing.assert_allclose(create_runner(onnx).logits(x), create_runner(model, 'eager').logits(x), atol=1e-4)
    best = read_checkpoint(result.best_checkpoint)  # timm's scripts load it strictly into the plain model
    assert not any(is_aux_key(k) for k in best['state_dict']) and best['train_args']['aux_weight'] == 0.3
    timm.create_model('googlenet_pcam', num_classes=2).load_state_dict(best['state_dict'], strict=True)
    for weight, hint in ((0.0, 'resume it with an --aux-weight above 0'), (None, None)):
        if weight is not None:  # switching the heads off: one line, not load_state_dict's traceback
            with pytest.raises(TrainError, match=f'trained with --aux-weight 0.3; {hint}'):
                train(_config(pcam_dir, tmp_path / 'run', aux_weight=weight, epochs=2,
                              resume=result.last_checkpoint))
    resumed = train(_config(pcam_dir, tmp_path / 'run', aux_weight=0.3, epochs=2, resume=result.last_checkpoint))
    assert len(resumed.history) == 2  # the aux heads' weights went through last.pth and back
    plain = train(_config(pcam_dir, tmp_path / 'plain'))
    with pytest.raises(TrainError, match='trained with --aux-weight 0; resume it with --aux-weight 0'):
        train(_config(pcam_dir, tmp_path / 'plain', aux_weight=0.3, epochs=2, resume=plain.last_checkpoint))


def test_aux_weight_on_a_model_without_aux_heads_is_one_line(pcam_dir, tmp_path, capsys) -> None:
    argv = ['--data-dir', str(pcam_dir), '--output', str(tmp_path / 'x'), '--model', 'inception_v4_pcam',
            '--model-kwargs', 'depths=1,1,1', '--no-pretrained', '--aux-weight', '0.3', '--workers', '0']
    assert cli(main, 'train', argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('train: error: --aux-weight: inception_v4_pcam has no auxiliary classifiers'), err
    assert cli(main, 'train', [*argv[:-4], '--aux-weight', '-1']) == 2
    assert '--aux-weight must be >= 0' in capsys.readouterr().err
