"""The two PCam Inception models: grids, timm API contract, stock weight compatibility, pretrained resolution."""
import os
import subprocess
import sys

import pytest
import timm
import torch
from timm.models import load_checkpoint  # noqa: F401  (import check: the timm API the plugin relies on)

from timm_inception_pcam.constants import LABEL_NAMES, PCAM_MEAN, PCAM_STD

MODELS = ('inception_v4_pcam', 'inception_resnet_v2_pcam')
STOCK = {'inception_v4_pcam': 'inception_v4', 'inception_resnet_v2_pcam': 'inception_resnet_v2'}
TINY = dict(depths=(1, 1, 1))


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('stem_stride,grids', [(2, (12, 6, 3)), (1, (24, 12, 6))])
def test_grids_follow_paper_proportions(name: str, stem_stride: int, grids: tuple[int, int, int]) -> None:
    model = timm.create_model(name, stem_stride=stem_stride, **TINY).eval()
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 3, 96, 96), intermediates_only=True)
    assert [f.shape[-1] for f in feats[2:]] == list(grids)
    assert [f.shape[1] for f in feats] == [info['num_chs'] for info in model.feature_info]
    assert [96 // f.shape[-1] for f in feats] == [info['reduction'] for info in model.feature_info]


@pytest.mark.parametrize('name', MODELS)
def test_full_size_forward_backward(name: str) -> None:
    model = timm.create_model(name)
    model.train()
    x = torch.randn(2, 3, 96, 96)
    out = model(x)
    assert out.shape == (2, 2)
    out.sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad
    assert model.forward_features(x).shape == (2, 1536, 3, 3)


@pytest.mark.parametrize('name', MODELS)
def test_stock_imagenet_state_dict_loads_strict_apart_from_head(name: str) -> None:
    stock = timm.create_model(STOCK[name])
    ours = timm.create_model(name)
    classifier = ours.pretrained_cfg['classifier']
    stock_sd = {k: v for k, v in stock.state_dict().items() if not k.startswith(classifier + '.')}
    result = ours.load_state_dict(stock_sd, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == [f'{classifier}.bias', f'{classifier}.weight']
    # and the loaded weights really are the stock ones
    key = ours.pretrained_cfg['first_conv'] + '.weight'
    assert torch.equal(ours.state_dict()[key], stock.state_dict()[key])


@pytest.mark.parametrize('name', MODELS)
def test_pretrained_cfg(name: str) -> None:
    model = timm.create_model(name, **TINY)
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 96, 96)
    assert cfg['pool_size'] == (3, 3)
    assert cfg['crop_pct'] == 1.0
    assert tuple(cfg['mean']) == PCAM_MEAN and tuple(cfg['std']) == PCAM_STD
    assert tuple(cfg['label_names']) == LABEL_NAMES
    assert model.num_classes == 2
    assert cfg['tag'] == 'tf_in1k'
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg['input_size'] == (3, 96, 96) and data_cfg['crop_pct'] == 1.0


@pytest.mark.parametrize('name', MODELS)
def test_pcam_tag_refuses_pretrained_until_published(name: str) -> None:
    with pytest.raises(RuntimeError, match=r'not published yet.*tf_in1k'):
        timm.create_model(f'{name}.pcam', pretrained=True)
    model = timm.create_model(f'{name}.pcam', pretrained=False, **TINY)
    assert model.pretrained_cfg['hf_hub_id'].endswith(f'/{name}')


@pytest.mark.parametrize('name', MODELS)
def test_tf_in1k_tag_loads_imagenet_weights_with_fresh_head(name: str, tmp_path) -> None:
    """The resolution path of `pretrained=True`, fed a local file standing in for timm's Hub weights."""
    from safetensors.torch import save_file

    stock = timm.create_model(STOCK[name])
    with torch.no_grad():
        for p in stock.parameters():
            p.normal_()
    path = tmp_path / 'model.safetensors'
    save_file({k: v.contiguous() for k, v in stock.state_dict().items()}, str(path))
    ours = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    first = ours.pretrained_cfg['first_conv'] + '.weight'
    assert torch.equal(ours.state_dict()[first], stock.state_dict()[first])
    assert ours.get_classifier().weight.shape == (2, 1536)
    assert ours.pretrained_cfg['hf_hub_id'] == f'timm/{STOCK[name]}.tf_in1k'


@pytest.mark.parametrize('name', MODELS)
def test_train_py_kwargs_accepted(name: str) -> None:
    """Exactly the keyword arguments timm's train.py passes to create_model."""
    model = timm.create_model(
        name, pretrained=False, in_chans=3, num_classes=2, drop_rate=0.2,
        drop_path_rate=0.1 if name == 'inception_resnet_v2_pcam' else 0.0, drop_block_rate=None,
        global_pool='avg', bn_momentum=0.05, bn_eps=1e-5, scriptable=False, checkpoint_path='', **TINY)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.eps == 1e-5 and bn.momentum == 0.05
    assert model.head_drop.p == 0.2


def test_v4_rejects_drop_path_with_reason() -> None:
    with pytest.raises(ValueError, match='no residual branches'):
        timm.create_model('inception_v4_pcam', drop_path_rate=0.1, **TINY)


def test_irv2_residual_scales_and_stochastic_depth() -> None:
    model = timm.create_model('inception_resnet_v2_pcam', depths=(2, 2, 2), scales=(0.3, 0.2, 0.1),
                              drop_path_rate=0.3)
    assert [b.scale for b in model.repeat] == [0.3, 0.3]
    assert [b.scale for b in model.repeat_2] == [0.1, 0.1]
    rates = [b.drop_path.drop_prob for b in (*model.repeat, *model.repeat_1, *model.repeat_2) if b.drop_path
             .__class__.__name__ == 'DropPath']
    assert rates == sorted(rates) and rates[-1] < 0.3 + 1e-6 and len(rates) == 5
    assert isinstance(model.block8.act, torch.nn.Identity)  # the last C block has no ReLU
    model.train()
    x = torch.randn(2, 3, 96, 96)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b)  # stochastic depth is active in training


@pytest.mark.parametrize('name', MODELS)
def test_grad_checkpointing_same_output_and_grads(name: str) -> None:
    model = timm.create_model(name, depths=(2, 2, 2)).eval()
    x = torch.randn(2, 3, 96, 96, requires_grad=True)
    ref = model(x)
    ref.sum().backward()
    ref_grad = x.grad.clone()
    x.grad = None
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, ref_grad)


@pytest.mark.parametrize('name', MODELS)
def test_features_only_and_intermediates(name: str) -> None:
    model = timm.create_model(name, features_only=True, **TINY).eval()
    x = torch.randn(1, 3, 96, 96)
    feats = model(x)
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    full = timm.create_model(name, **TINY).eval()
    final, inter = full.forward_intermediates(x)
    torch.testing.assert_close(final, full.forward_features(x))
    assert len(inter) == 5
    taken = full.prune_intermediate_layers(indices=[1, 2])
    assert taken == [1, 2]
    pruned = full.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    assert [f.shape[1] for f in pruned] == [info['num_chs'] for info in full.feature_info[1:3]]
    assert full.num_features == full.feature_info[2]['num_chs']


@pytest.mark.parametrize('name', MODELS)
def test_reset_classifier_and_groups(name: str) -> None:
    model = timm.create_model(name, **TINY)
    model.reset_classifier(5)
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 5)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 1536)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert len(groups) > 1


@pytest.mark.parametrize('name', MODELS)
def test_torchscript_and_fx(name: str) -> None:
    from timm.models import get_graph_node_names

    model = timm.create_model(name, **TINY).eval()
    x = torch.randn(2, 3, 96, 96)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x))
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert len(eval_nodes) > 20


@pytest.mark.parametrize('name', MODELS)
def test_device_meta_and_dtype(name: str) -> None:
    model = timm.create_model(name, device='meta', **TINY)
    assert all(p.device.type == 'meta' for p in model.parameters())
    model = timm.create_model(name, dtype=torch.bfloat16, **TINY)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_unknown_kwarg_raises_type_error() -> None:
    with pytest.raises(TypeError):
        timm.create_model('inception_v4_pcam', not_an_argument=1)


@pytest.mark.parametrize('name', MODELS)
def test_tf_in1k_resolves_through_offline_hf_cache(name: str, tmp_path) -> None:
    """`pretrained=True` goes to timm's Hub repo for the ImageNet weights: served here by a cache the test fills."""
    from safetensors.torch import save_file

    stock = timm.create_model(STOCK[name])
    with torch.no_grad():
        for p in stock.parameters():
            p.uniform_(-1, 1)
    revision = 'a' * 40
    repo = tmp_path / 'hub' / f'models--timm--{STOCK[name]}.tf_in1k'
    snapshot = repo / 'snapshots' / revision
    snapshot.mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(revision)
    save_file({k: v.contiguous() for k, v in stock.state_dict().items()}, str(snapshot / 'model.safetensors'))
    first = timm.create_model(name).pretrained_cfg['first_conv'] + '.weight'
    expected = tmp_path / 'expected.pt'
    torch.save(stock.state_dict()[first], expected)
    code = (f"import torch, timm; m = timm.create_model('{name}', pretrained=True); "
            f"assert torch.equal(m.state_dict()['{first}'], torch.load(r'{expected}')); "
            f"assert m.get_classifier().weight.shape == (2, 1536); print('ok')")
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': str(tmp_path / 'hub'),
           'HF_HOME': str(tmp_path / 'hf_home')}
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-2000:]
