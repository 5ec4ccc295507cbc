"""The added PCam models (GoogLeNet, Inception-v3, Inception-ResNet-v1, VGG16): grids, timm API, aux heads, weights."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from timm_inception_pcam.constants import LABEL_NAMES, PCAM_MEAN, PCAM_STD
from timm_inception_pcam.errors import PCamError, UsageError
from timm_inception_pcam.models import drop_aux_heads, googlenet_pcam, inception_v3_pcam, vgg16_pcam
from timm_inception_pcam.models._common import WeightsUnavailableError, is_aux_key

MODELS = ('googlenet_pcam', 'inception_v3_pcam', 'inception_resnet_v1_pcam', 'vgg16_pcam', 'vgg16_bn_pcam')
AUX_MODELS = {'googlenet_pcam': 2, 'inception_v3_pcam': 1}  # model -> number of auxiliary classifiers
KWARGS = {'inception_resnet_v1_pcam': dict(depths=(1, 1, 1))}  # small test variant where the model has depths
# Documented grids at 96 px: one per feature tap (feature_info), the last one the forward_features grid.
GRIDS = {
    'googlenet_pcam': [48, 24, 12, 6, 3],
    'inception_v3_pcam': [48, 24, 12, 6, 3],
    'inception_resnet_v1_pcam': [48, 24, 12, 6, 3],
    'vgg16_pcam': [96, 48, 24, 12, 6, 3],
    'vgg16_bn_pcam': [96, 48, 24, 12, 6, 3],
}
NUM_FEATURES = {'googlenet_pcam': 1024, 'inception_v3_pcam': 2048, 'inception_resnet_v1_pcam': 1792,
                'vgg16_pcam': 512, 'vgg16_bn_pcam': 512}
IMAGENET_TAG = {'googlenet_pcam': 'tv_in1k', 'inception_v3_pcam': 'tv_in1k', 'vgg16_pcam': 'tv_in1k',
                'vgg16_bn_pcam': 'tv_in1k'}


def create(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, **{**KWARGS.get(name, {}), **kwargs})


def x96(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 96, 96)


@pytest.mark.parametrize('name', ['googlenet_pcam', 'inception_v3_pcam', 'inception_resnet_v1_pcam'])
def test_stem_stride_1_doubles_every_grid(name: str) -> None:
    model = create(name, stem_stride=1).eval()
    with torch.no_grad():
        feats = model.forward_intermediates(x96(1), intermediates_only=True)
    assert [f.shape[-1] for f in feats] == [2 * g for g in GRIDS[name]]
    assert [96 // f.shape[-1] for f in feats] == [info['reduction'] for info in model.feature_info]


def test_vgg_fc_layers_keep_the_3x3_grid() -> None:
    """The 7x7 'FC' convolution is padded: at 96 px it works on the 3x3 grid rather than on a stretched 7x7 one."""
    model = timm.create_model('vgg16_pcam').eval()
    with torch.no_grad():
        features = model.forward_features(x96(1))
        hidden = model.pre_logits(features)
        model.reset_classifier(0, '')
        unpooled = model(x96(1))
    assert features.shape == (1, 512, 3, 3)
    assert hidden.shape == (1, 4096, 3, 3)
    assert unpooled.shape == (1, 4096, 3, 3)
    assert model.pre_logits.fc1.weight.shape == (4096, 512, 7, 7)


@pytest.mark.parametrize('name', MODELS)
def test_forward_backward_with_and_without_grad_checkpointing(name: str) -> None:
    model = create(name).train()  # no dropout by default: both passes compute the same function
    x = x96().requires_grad_()
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2)
    out.sum().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    ref_grad = x.grad.clone()
    x.grad = None
    model.set_grad_checkpointing(True)
    again = model(x)
    again.sum().backward()
    torch.testing.assert_close(again, out)
    torch.testing.assert_close(x.grad, ref_grad)


@pytest.mark.parametrize('name', AUX_MODELS)
def test_aux_contract(name: str) -> None:
    """aux_logits=True in training mode: (logits, (aux, ...)); in eval mode, or without aux heads: plain logits."""
    model = timm.create_model(name, aux_logits=True).train()
    out = model(x96())
    assert isinstance(out, tuple) and len(out) == 2
    logits, aux = out
    assert logits.shape == (2, 2)
    assert isinstance(aux, tuple) and len(aux) == AUX_MODELS[name]
    assert all(a.shape == (2, 2) for a in aux)
    (logits.sum() + sum(a.sum() for a in aux)).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]  # the aux heads are trained too
    aux_params = [n for n, _ in model.named_parameters() if is_aux_key(n)]
    assert aux_params and all(n.split('.')[0] in ('aux', 'aux1', 'aux2') for n in aux_params)

    model.eval()
    with torch.no_grad():
        plain = model(x96())
    assert isinstance(plain, torch.Tensor) and plain.shape == (2, 2)
    assert not [n for n, _ in timm.create_model(name, device='meta').named_parameters() if is_aux_key(n)]


@pytest.mark.parametrize('name', AUX_MODELS)
def test_aux_heads_follow_reset_and_prune(name: str) -> None:
    model = timm.create_model(name, aux_logits=True)
    model.reset_classifier(5)
    logits, aux = model.train()(x96())
    assert logits.shape == (2, 5) and all(a.shape == (2, 5) for a in aux)
    model.prune_intermediate_layers(indices=[1, 2])
    assert not [n for n, _ in model.named_parameters() if is_aux_key(n)]
    assert isinstance(model(x96()), torch.Tensor)  # no aux heads left: plain output in training mode


@pytest.mark.parametrize('name', AUX_MODELS)
def test_aux_checkpoint_loads_into_plain_model_after_drop_aux_heads(name: str) -> None:
    with_aux = timm.create_model(name, aux_logits=True).eval()
    state_dict = with_aux.state_dict()
    plain = timm.create_model(name).eval()
    with pytest.raises(RuntimeError, match='Unexpected key'):
        plain.load_state_dict(state_dict)
    plain.load_state_dict(drop_aux_heads(state_dict))  # strict
    x = x96()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), with_aux(x))


def test_drop_aux_heads_removes_only_aux_modules() -> None:
    t = torch.zeros(1)
    state_dict = {'aux.fc.weight': t, 'aux1.conv.conv.weight': t, 'aux2.fc2.bias': t, 'module.aux1.fc1.weight': t,
                  'fc.weight': t, 'auxiliary_gate.weight': t, 'Mixed_6e.aux.weight': t, 'conv1.conv.weight': t}
    kept = drop_aux_heads(state_dict)
    assert sorted(kept) == ['Mixed_6e.aux.weight', 'auxiliary_gate.weight', 'conv1.conv.weight', 'fc.weight']
    assert kept['fc.weight'] is t and 'aux.fc.weight' in state_dict  # the input is left alone


@pytest.mark.parametrize('name', AUX_MODELS)
def test_features_only_leaves_aux_heads_out(name: str) -> None:
    model = timm.create_model(name, aux_logits=True, features_only=True).eval()
    with torch.no_grad():
        feats = model(x96())
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert not [n for n, _ in model.named_parameters() if is_aux_key(n)]


@pytest.mark.parametrize('name', MODELS)
def test_grids_features_only_and_intermediates(name: str) -> None:
    """The documented grids at every feature tap, through forward_intermediates and features_only alike."""
    x = x96(1)
    full = create(name).eval()
    with torch.no_grad():
        final, inter = full.forward_intermediates(x)
        torch.testing.assert_close(final, full.forward_features(x))
        pre_logits = full.forward_head(final, pre_logits=True)
        early = full.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    assert [f.shape[-1] for f in inter] == [f.shape[-2] for f in inter] == GRIDS[name]
    assert [f.shape[1] for f in inter] == [info['num_chs'] for info in full.feature_info]
    assert [96 // f.shape[-1] for f in inter] == [info['reduction'] for info in full.feature_info]
    assert final.shape == (1, NUM_FEATURES[name], 3, 3)
    assert pre_logits.shape == (1, full.head_hidden_size)
    torch.testing.assert_close(early[0], inter[1])

    features = create(name, features_only=True).eval()
    with torch.no_grad():
        feats = features(x)
    assert [f.shape[1] for f in feats] == features.feature_info.channels()
    assert [f.shape[-1] for f in feats] == GRIDS[name]

    taken = full.prune_intermediate_layers(indices=[1, 2])
    assert taken == [1, 2]
    with torch.no_grad():
        pruned = full.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    assert [f.shape[1] for f in pruned] == [info['num_chs'] for info in full.feature_info[1:3]]
    assert full.num_features == full.feature_info[2]['num_chs']


@pytest.mark.parametrize('name', MODELS)
def test_torchscript_and_fx(name: str) -> None:
    from timm.models import get_graph_node_names

    aux = name in AUX_MODELS
    model = create(name, aux_logits=True).eval() if aux else create(name).eval()
    x = x96()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
        if aux:  # TorchScript always gives plain logits, in training mode too
            assert isinstance(scripted.train()(x), torch.Tensor)
    train_nodes, eval_nodes = get_graph_node_names(model)  # FX traces the aux heads in training mode
    assert len(eval_nodes) > 20
    assert any(n.startswith('aux') for n in train_nodes) == aux
    assert not any(n.startswith('aux') for n in eval_nodes)


@pytest.mark.parametrize('name', MODELS)
def test_reset_classifier_and_groups(name: str) -> None:
    model = create(name).eval()
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(x96(1)).shape == (1, 5)
        model.reset_classifier(0)
        assert model(x96(1)).shape == (1, model.head_hidden_size)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert len(groups) > 2


@pytest.mark.parametrize('name', MODELS)
def test_pretrained_cfg(name: str) -> None:
    model = create(name)
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 96, 96) and cfg['pool_size'] == (3, 3) and cfg['crop_pct'] == 1.0
    assert tuple(cfg['mean']) == PCAM_MEAN and tuple(cfg['std']) == PCAM_STD
    assert tuple(cfg['label_names']) == LABEL_NAMES
    assert model.num_classes == 2
    assert cfg.get('tag') == IMAGENET_TAG.get(name)  # no tag: the weightless default of Inception-ResNet-v1
    if name in IMAGENET_TAG:
        assert cfg.get('hf_hub_id') or cfg.get('url')
    else:
        assert not (cfg.get('hf_hub_id') or cfg.get('url') or cfg.get('file'))
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg['input_size'] == (3, 96, 96) and data_cfg['crop_pct'] == 1.0


@pytest.mark.parametrize('name', MODELS)
def test_pcam_tag_refuses_pretrained_until_published(name: str) -> None:
    hint = IMAGENET_TAG.get(name, 'no ImageNet weights exist')
    with pytest.raises(RuntimeError, match=rf'not published yet.*{hint}') as info:
        timm.create_model(f'{name}.pcam', pretrained=True)
    assert isinstance(info.value, PCamError)
    model = create(f'{name}.pcam', pretrained=False)
    assert model.pretrained_cfg['hf_hub_id'].endswith(f'/{name}')


def test_inception_resnet_v1_has_no_imagenet_weights(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match='no ImageNet weights exist'):
        timm.create_model('inception_resnet_v1_pcam', pretrained=True)
    # weights of your own still load through the pretrained path
    from safetensors.torch import save_file

    source = timm.create_model('inception_resnet_v1_pcam', depths=(1, 1, 1))
    path = tmp_path / 'own.safetensors'
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = timm.create_model('inception_resnet_v1_pcam', depths=(1, 1, 1), pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(loaded.classif.weight, source.classif.weight)


@pytest.mark.parametrize('name', MODELS)
def test_train_py_kwargs_accepted(name: str) -> None:
    """Exactly the keyword arguments timm's train.py passes to create_model."""
    has_bn = name != 'vgg16_pcam'
    model = create(
        name, pretrained=False, in_chans=3, num_classes=2, drop_rate=0.2,
        drop_path_rate=0.1 if name == 'inception_resnet_v1_pcam' else 0.0, drop_block_rate=None, global_pool='avg',
        scriptable=False, checkpoint_path='', **(dict(bn_momentum=0.05, bn_eps=1e-5) if has_bn else {}))
    if has_bn:
        bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        assert bn.eps == 1e-5 and bn.momentum == 0.05
    drops = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert 0.2 in drops


def test_vgg16_without_bn_refuses_bn_settings() -> None:
    with pytest.raises(UsageError, match='no BatchNorm.*vgg16_bn_pcam'):
        timm.create_model('vgg16_pcam', bn_eps=1e-5)


@pytest.mark.parametrize('name', ['googlenet_pcam', 'inception_v3_pcam', 'vgg16_pcam'])
def test_no_residual_branches_refuse_drop_path(name: str) -> None:
    with pytest.raises(UsageError, match='no residual branches'):
        timm.create_model(name, drop_path_rate=0.1)


@pytest.mark.parametrize('name, low', [('inception_v4_pcam', 'positive'), ('inception_resnet_v1_pcam', 'non-negative'),
                                       ('inception_resnet_v2_pcam', 'non-negative')])
@pytest.mark.parametrize('depths', ['a,b', (1, 1), (1, -1, 1), (1.5, 1, 1)])
def test_bad_depths_say_what_is_expected(name: str, low: str, depths) -> None:
    with pytest.raises(UsageError, match=rf'depths must be three {low} block counts \(A, B, C\), e.g. depths=1,1,1'):
        timm.create_model(name, depths=depths)


def test_googlenet_kernel_5x5() -> None:
    tv_like = timm.create_model('googlenet_pcam')
    table_1 = timm.create_model('googlenet_pcam', kernel_5x5=5).eval()
    assert tv_like.inception3a.branch3[1].conv.weight.shape[-2:] == (3, 3)
    assert table_1.inception3a.branch3[1].conv.weight.shape[-2:] == (5, 5)
    with torch.no_grad():
        assert table_1(x96(1)).shape == (1, 2)
    with pytest.raises(UsageError, match='kernel_5x5'):
        timm.create_model('googlenet_pcam', kernel_5x5=7)


def test_irv1_paper_widths_scales_and_stochastic_depth() -> None:
    model = timm.create_model('inception_resnet_v1_pcam', depths=(2, 2, 2), scales=(0.3, 0.2, 0.1),
                              drop_path_rate=0.3)
    # Figure 7 with k, l, m, n = 192, 192, 256, 384; Figures 10-13 widths
    assert model.mixed_6a.branch0.conv.out_channels == 384
    assert [m.conv.out_channels for m in model.mixed_6a.branch1] == [192, 192, 256]
    assert model.repeat[0].conv2d.out_channels == 256 and model.repeat_1[0].conv2d.out_channels == 896
    assert model.repeat_2[0].conv2d.out_channels == 1792
    assert [b.scale for b in model.repeat] == [0.3, 0.3] and [b.scale for b in model.repeat_2] == [0.1, 0.1]
    rates = [b.drop_path.drop_prob for b in (*model.repeat, *model.repeat_1, *model.repeat_2)
             if isinstance(b.drop_path, timm.layers.DropPath)]
    assert rates == sorted(rates) and len(rates) == 5 and abs(rates[-1] - 0.3) < 1e-6
    model.train()
    x = x96()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b)  # stochastic depth is active in training


@pytest.mark.parametrize('name', MODELS)
def test_device_meta_and_dtype(name: str) -> None:
    model = create(name, device='meta')
    assert all(p.device.type == 'meta' for p in model.parameters())
    if name.startswith('vgg'):
        return  # 134 M parameters: the dtype path is the same code, checked on the smaller models
    model = create(name, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# --- stock ImageNet architectures (random weights: nothing downloads) ---------------------------------------------

def _torchvision_googlenet() -> dict[str, torch.Tensor]:
    import torchvision

    return torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True).state_dict()


def _stock_state_dict(name: str, aux: bool = True) -> dict[str, torch.Tensor]:
    if name == 'googlenet_pcam':
        return _torchvision_googlenet()
    stock = {'inception_v3_pcam': 'inception_v3', 'vgg16_pcam': 'vgg16', 'vgg16_bn_pcam': 'vgg16_bn'}[name]
    kwargs = dict(aux_logits=True) if name == 'inception_v3_pcam' and aux else {}
    model = timm.create_model(stock, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1, 1)
    return model.state_dict()


FILTERS = {'googlenet_pcam': googlenet_pcam.checkpoint_filter_fn,
           'inception_v3_pcam': inception_v3_pcam.checkpoint_filter_fn,
           'vgg16_pcam': vgg16_pcam.checkpoint_filter_fn, 'vgg16_bn_pcam': vgg16_pcam.checkpoint_filter_fn}
HEADS = {'googlenet_pcam': ('fc', 'aux1.fc2', 'aux2.fc2'), 'inception_v3_pcam': ('fc', 'aux.fc'),
         'vgg16_pcam': ('head.fc',), 'vgg16_bn_pcam': ('head.fc',)}


@pytest.mark.parametrize('name', IMAGENET_TAG)
def test_stock_state_dict_loads_strictly_apart_from_classifiers(name: str) -> None:
    """Stock names (timm's inception_v3 / vgg16 / vgg16_bn, torchvision's googlenet) map key for key onto ours."""
    ours = timm.create_model(name, aux_logits=True) if name in AUX_MODELS else timm.create_model(name)
    stock = _stock_state_dict(name)
    own = ours.state_dict()
    head_keys = {f'{h}.{s}' for h in HEADS[name] for s in ('weight', 'bias')}
    renamed = {k.replace('AuxLogits.', 'aux.'): v for k, v in stock.items()}
    assert set(renamed) - head_keys == set(own) - head_keys
    assert all(renamed[k].shape == own[k].shape for k in set(own) - head_keys)
    mapped = FILTERS[name](dict(stock), ours)
    ours.load_state_dict(mapped)  # strict
    loaded = ours.state_dict()
    first = ours.pretrained_cfg['first_conv'] + '.weight'
    assert torch.equal(loaded[first], stock[first])
    for k in head_keys:  # the classifiers keep their fresh 2-class initialisation
        assert loaded[k].shape[0] == 2 and torch.equal(loaded[k], own[k])


def _save(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


def test_vgg_filter_also_takes_torchvision_layout() -> None:
    """torchvision's vgg16 keeps FC layers as Linear (`classifier.0/3/6`): they become our 7x7 / 1x1 convolutions."""
    stock = _stock_state_dict('vgg16_pcam')
    tv_names = {'pre_logits.fc1.': 'classifier.0.', 'pre_logits.fc2.': 'classifier.3.', 'head.fc.': 'classifier.6.'}
    torchvision_layout = {}
    for key, value in stock.items():
        for ours, theirs in tv_names.items():
            if key.startswith(ours):
                key, value = theirs + key[len(ours):], value.flatten(1) if value.ndim == 4 else value
        torchvision_layout[key] = value
    assert torchvision_layout['classifier.0.weight'].shape == (4096, 512 * 7 * 7)
    model = timm.create_model('vgg16_pcam')
    model.load_state_dict(vgg16_pcam.checkpoint_filter_fn(torchvision_layout, model))  # strict
    assert torch.equal(model.pre_logits.fc1.weight, stock['pre_logits.fc1.weight'])
    assert torch.equal(model.pre_logits.fc2.weight, stock['pre_logits.fc2.weight'])
    assert model.head.fc.weight.shape == (2, 4096)


def test_googlenet_tv_in1k_loads_torchvision_weights_fresh_aux_and_head(tmp_path: Path) -> None:
    """torchvision's checkpoint through pretrained=True: trunk loaded, its untrained aux heads and head replaced."""
    stock = _torchvision_googlenet()
    path = _save(stock, tmp_path / 'googlenet.safetensors')
    for aux in (False, True):
        ours = timm.create_model('googlenet_pcam', pretrained=True, aux_logits=aux,
                                 pretrained_cfg_overlay=dict(file=str(path)))
        sd = ours.state_dict()
        assert torch.equal(sd['inception4e.branch3.1.conv.weight'], stock['inception4e.branch3.1.conv.weight'])
        assert sd['fc.weight'].shape == (2, 1024)
        assert ('aux1.fc1.weight' in sd) == aux
        if aux:
            assert not torch.equal(sd['aux1.fc1.weight'], stock['aux1.fc1.weight'])


def test_googlenet_loads_aux_heads_trained_for_its_classes(tmp_path: Path) -> None:
    """A PCam GoogLeNet saved with its auxiliary heads gives them back through pretrained=True (they were dropped:
    only torchvision's 1000-class, untrained ones start fresh)."""
    trained = timm.create_model('googlenet_pcam', aux_logits=True).state_dict()
    path = _save(trained, tmp_path / 'pcam_googlenet.safetensors')
    ours = timm.create_model('googlenet_pcam', pretrained=True, aux_logits=True,
                             pretrained_cfg_overlay=dict(file=str(path))).state_dict()
    assert all(torch.equal(ours[k], v) for k, v in trained.items())
    assert any(is_aux_key(k) for k in trained)


@pytest.mark.parametrize('aux', [False, True])
def test_inception_v3_tv_in1k_loads_trained_aux_head(aux: bool, tmp_path: Path) -> None:
    stock = _stock_state_dict('inception_v3_pcam')
    path = _save(stock, tmp_path / 'v3.safetensors')
    ours = timm.create_model('inception_v3_pcam', pretrained=True, aux_logits=aux,
                             pretrained_cfg_overlay=dict(file=str(path)))
    sd = ours.state_dict()
    assert torch.equal(sd['Mixed_7c.branch3x3dbl_3b.conv.weight'], stock['Mixed_7c.branch3x3dbl_3b.conv.weight'])
    if aux:
        assert torch.equal(sd['aux.conv1.conv.weight'], stock['AuxLogits.conv1.conv.weight'])
        assert sd['aux.fc.weight'].shape == (2, 768)
    else:
        assert not any(is_aux_key(k) for k in sd)
    # tf_in1k / gluon_in1k checkpoints have no aux head: an aux model then keeps a fresh one
    no_aux_path = _save(_stock_state_dict('inception_v3_pcam', aux=False), tmp_path / 'v3_tf.safetensors')
    fresh = timm.create_model('inception_v3_pcam.tf_in1k', pretrained=True, aux_logits=True,
                              pretrained_cfg_overlay=dict(file=str(no_aux_path)))
    assert fresh.aux is not None


# --- pretrained=True resolving through offline caches, as a user's machine would --------------------------------

def _run_offline(code: str, tmp_path: Path, **env_extra: str) -> None:
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': str(tmp_path / 'hub'),
           'HF_HOME': str(tmp_path / 'hf_home'), 'TORCH_HOME': str(tmp_path / 'torch'), **env_extra}
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-2000:]


@pytest.mark.parametrize('name,stock,tag', [
    ('inception_v3_pcam', 'inception_v3', 'tv_in1k'),
    ('vgg16_pcam', 'vgg16', 'tv_in1k'),
    ('vgg16_bn_pcam', 'vgg16_bn', 'tv_in1k'),
])
def test_imagenet_tag_resolves_through_offline_hf_cache(name: str, stock: str, tag: str, tmp_path: Path) -> None:
    """`pretrained=True` goes to timm's Hub repo for the ImageNet weights: served here by a cache the test fills."""
    revision = 'b' * 40
    repo = tmp_path / 'hub' / f'models--timm--{stock}.{tag}'
    state_dict = _stock_state_dict(name)
    _save(state_dict, repo / 'snapshots' / revision / 'model.safetensors')
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(revision)
    first = timm.create_model(name, device='meta').pretrained_cfg['first_conv'] + '.weight'
    torch.save(state_dict[first], tmp_path / 'expected.pt')
    code = (f"import torch, timm; m = timm.create_model('{name}', pretrained=True); "
            f"assert m.pretrained_cfg['hf_hub_id'] == 'timm/{stock}.{tag}'; "
            f"assert torch.equal(m.state_dict()['{first}'], torch.load(r'{tmp_path / 'expected.pt'}')); "
            f"assert m.get_classifier().weight.shape[0] == 2; print('ok')")
    _run_offline(code, tmp_path)


def test_googlenet_tv_in1k_resolves_through_offline_torch_hub_cache(tmp_path: Path) -> None:
    """googlenet_pcam.tv_in1k points at torchvision's URL: served here from the torch hub cache the test fills."""
    stock = _torchvision_googlenet()
    checkpoints = tmp_path / 'torch' / 'hub' / 'checkpoints'
    checkpoints.mkdir(parents=True)
    torch.save(stock, checkpoints / 'googlenet-1378be20.pth')
    torch.save(stock['conv1.conv.weight'], tmp_path / 'expected.pt')
    code = ("import torch, timm; m = timm.create_model('googlenet_pcam', pretrained=True); "
            "assert m.pretrained_cfg['url'].endswith('/googlenet-1378be20.pth'); "
            f"assert torch.equal(m.state_dict()['conv1.conv.weight'], torch.load(r'{tmp_path / 'expected.pt'}')); "
            "assert m.get_classifier().weight.shape == (2, 1024); print('ok')")
    _run_offline(code, tmp_path)
