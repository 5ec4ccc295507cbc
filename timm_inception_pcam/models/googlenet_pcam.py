""" GoogLeNet (Inception-v1) for PatchCamelyon (96x96 patches, normal / metastatic)

Paper: `Going Deeper with Convolutions`
    - https://arxiv.org/abs/1409.4842 (Szegedy et al. 2014), Table 1, Figure 2(b), Figure 3 and section 5.

Adapted to PCam: every convolution and pool is padded so that only a stride shrinks a grid (all four max pools are
Table 1's 3x3 stride 2). The paper's 28 / 14 / 7 grids of the inception (3), (4) and (5) stages at 224 px become
12 / 6 / 3 at 96 px (24 / 12 / 6 with `stem_stride=1`). The two auxiliary classifiers (section 5) sit on 4a and 4d
and exist only with `aux_logits=True`; in training mode `forward` then returns `(logits, (aux1, aux2))`.

Parameter names and shapes follow torchvision's `googlenet`, so its ImageNet weights (`tv_in1k`) load with only the
classifiers replaced. Like that release, the "5x5" branch of each Inception module uses a 3x3 kernel (the weights
were trained with it); `kernel_5x5=5` gives Table 1's 5x5 kernel, for training from scratch.
"""
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier, get_device_dtype
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..errors import UsageError
from ._common import (
    PCAM_HUB_ORG,
    LayerTrunk,
    adapt_head_filter,
    check_no_drop_block,
    check_no_drop_path,
    check_pretrained_available,
    layer_group_matcher,
    make_conv_block,
    max_pool,
    pcam_cfg,
)

__all__ = ['GoogLeNetPcam']


class Inception(nn.Module):
    """Figure 2(b), Inception module with dimension reductions; the arguments are Table 1's columns.

    1x1 || 1x1 -> 3x3 || 1x1 -> 5x5 || 3x3 max pool -> 1x1 (pool proj).
    """

    def __init__(
            self,
            conv_block: partial,
            in_chs: int,
            ch1x1: int,
            ch3x3red: int,
            ch3x3: int,
            ch5x5red: int,
            ch5x5: int,
            pool_proj: int,
            kernel_5x5: int = 3,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.branch1 = conv_block(in_chs, ch1x1, kernel_size=1, **dd)
        self.branch2 = nn.Sequential(
            conv_block(in_chs, ch3x3red, kernel_size=1, **dd),
            conv_block(ch3x3red, ch3x3, kernel_size=3, **dd),
        )
        self.branch3 = nn.Sequential(
            conv_block(in_chs, ch5x5red, kernel_size=1, **dd),
            conv_block(ch5x5red, ch5x5, kernel_size=kernel_5x5, **dd),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1),
            conv_block(in_chs, pool_proj, kernel_size=1, **dd),
        )
        self.out_chs = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)), 1)


class AuxClassifier(nn.Module):
    """Section 5, auxiliary classifier: average pool to 4x4, 1x1 conv (128), FC 1024 + ReLU, 70% dropout, linear.

    The paper's 5x5 stride-3 average pool turns the 14x14 grid at 224 px into 4x4; an adaptive pool gives the same
    4x4 grid (that FC 1024 expects) from the 6x6 grid at 96 px, or any other.
    """

    def __init__(self, conv_block: partial, in_chs: int, num_classes: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv = conv_block(in_chs, 128, kernel_size=1, **dd)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024, **dd)
        self.drop = nn.Dropout(0.7)
        self.fc2 = nn.Linear(1024, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int) -> None:
        self.fc2 = nn.Linear(1024, num_classes, **get_device_dtype(self)) if num_classes > 0 else nn.Identity()
        self.fc2.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.adaptive_avg_pool2d(x, (4, 4)))
        x = self.drop(F.relu(self.fc1(torch.flatten(x, 1)), inplace=True))
        return self.fc2(x)


# Table 1, rows inception (3a) to (5b): #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
TABLE_1: dict[str, tuple[int, int, int, int, int, int]] = {
    'inception3a': (64, 96, 128, 16, 32, 32),
    'inception3b': (128, 128, 192, 32, 96, 64),
    'inception4a': (192, 96, 208, 16, 48, 64),
    'inception4b': (160, 112, 224, 24, 64, 64),
    'inception4c': (128, 128, 256, 24, 64, 64),
    'inception4d': (112, 144, 288, 32, 64, 64),
    'inception4e': (256, 160, 320, 32, 128, 128),
    'inception5a': (256, 160, 320, 32, 128, 128),
    'inception5b': (384, 192, 384, 48, 128, 128),
}


class GoogLeNetPcam(LayerTrunk, nn.Module):
    """GoogLeNet (Inception-v1) on 96x96 PCam patches.

    Args:
        num_classes: Classifier outputs (2: normal, metastatic).
        in_chans: Input channels.
        stem_stride: Stride of the first (7x7) conv: 2 gives grids 12 / 6 / 3 at 96 px, 1 gives 24 / 12 / 6.
        aux_logits: Add the two auxiliary classifiers (on 4a and 4d). In training mode `forward` then returns
            `(logits, (aux1, aux2))`; in eval mode, and always under TorchScript, plain logits.
        kernel_5x5: Kernel of the "5x5" branch: 3 as torchvision's release (needed by its ImageNet weights), 5 as
            Table 1.
        drop_rate: Dropout before the classifier (Table 1: 40%).
        drop_path_rate: Accepted for train.py compatibility; must be 0 (no residual branches).
        global_pool: Global pooling type.
        norm_eps, bn_eps, bn_momentum: BatchNorm settings (`bn_*` as passed by timm's train.py override).
    """
    aux_logits: torch.jit.Final[bool]

    def __init__(
            self,
            num_classes: int = 2,
            in_chans: int = 3,
            stem_stride: int = 2,
            aux_logits: bool = False,
            kernel_5x5: int = 3,
            output_stride: int = 32,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            drop_block_rate: float | None = None,
            global_pool: str = 'avg',
            norm_layer: str = 'batchnorm2d',
            norm_eps: float = 1e-3,
            bn_eps: float | None = None,
            bn_momentum: float | None = None,
            act_layer: str = 'relu',
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if stem_stride not in (1, 2):
            raise UsageError(f'stem_stride must be 1 or 2, got {stem_stride}')
        if output_stride != 32:
            raise UsageError(f'output_stride must be 32, got {output_stride}')
        if kernel_5x5 not in (3, 5):
            raise UsageError(f'kernel_5x5 must be 3 (torchvision release) or 5 (Table 1), got {kernel_5x5}')
        check_no_drop_path(drop_path_rate, 'GoogLeNet')
        check_no_drop_block(drop_block_rate)
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.aux_logits = aux_logits
        self.grad_checkpointing = False
        conv_block = make_conv_block(norm_layer, norm_eps, bn_eps, bn_momentum, act_layer)

        # Table 1: convolution 7x7/2, max pool, convolution 3x3 (with its 1x1 reduce), max pool
        self.conv1 = conv_block(in_chans, 64, kernel_size=7, stride=stem_stride, **dd)
        self.maxpool1 = max_pool()
        self.conv2 = conv_block(64, 64, kernel_size=1, **dd)
        self.conv3 = conv_block(64, 192, kernel_size=3, **dd)
        self.maxpool2 = max_pool()
        in_chs = 192
        for name, row in TABLE_1.items():
            block = Inception(conv_block, in_chs, *row, kernel_5x5=kernel_5x5, **dd)
            setattr(self, name, block)
            in_chs = block.out_chs
            if name == 'inception3b':
                self.maxpool3 = max_pool()
            elif name == 'inception4e':
                self.maxpool4 = max_pool()
        self.num_features = in_chs  # 1024

        self.layer_names = [
            'conv1', 'maxpool1', 'conv2', 'conv3', 'maxpool2', 'inception3a', 'inception3b', 'maxpool3',
            'inception4a', 'inception4b', 'inception4c', 'inception4d', 'inception4e', 'maxpool4',
            'inception5a', 'inception5b',
        ]
        r = stem_stride
        self.feature_info = [
            dict(num_chs=64, reduction=r, module='conv1'),
            dict(num_chs=192, reduction=2 * r, module='conv3'),
            dict(num_chs=480, reduction=4 * r, module='inception3b'),
            dict(num_chs=832, reduction=8 * r, module='inception4e'),
            dict(num_chs=self.num_features, reduction=16 * r, module='inception5b'),
        ]
        self.feature_ends = [self.layer_names.index(info['module']) for info in self.feature_info]
        self.global_pool, self.head_drop, self.fc = create_classifier(
            self.num_features, self.num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

        # registered last, so that features_only (which keeps the modules up to the last feature tap) leaves them out
        self.aux_taps = {'inception4a': 'aux1', 'inception4d': 'aux2'} if aux_logits else {}
        self.aux1 = AuxClassifier(conv_block, 512, num_classes, **dd) if aux_logits else None
        self.aux2 = AuxClassifier(conv_block, 528, num_classes, **dd) if aux_logits else None

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """Parameter groups in forward order: the stem, then each Inception module (with the aux head it feeds)."""
        blocks = [(name, self.aux_taps[name]) if name in self.aux_taps else (name,) for name in TABLE_1]
        return layer_group_matcher([('conv1', 'conv2', 'conv3'), *blocks])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, **get_device_dtype(self))
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)
        for aux in (self.aux1, self.aux2):
            if aux is not None:
                aux.reset(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self.forward_trunk(x)[0]
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4d(self.inception4c(self.inception4b(self.inception4a(x))))
        x = self.maxpool4(self.inception4e(x))
        return self.inception5b(self.inception5a(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Logits; with `aux_logits=True` in training mode (eager, FX), `(logits, (aux1, aux2))`."""
        if self.aux_logits and self.training and not torch.jit.is_scripting():
            x, _, aux = self.forward_trunk(x, with_aux=True)
            return self.forward_head(x), (aux[0], aux[1])
        return self.forward_head(self.forward_features(x))


def _trained_aux(state_dict: dict[str, torch.Tensor], model: nn.Module) -> bool:
    """Whether the checkpoint's auxiliary heads were trained for this model: their classifiers fit its classes.
    torchvision's are untrained ("NOT pretrained", its googlenet() warns) and 1000-class."""
    own = model.state_dict()
    keys = [k for k in ('aux1.fc2.weight', 'aux2.fc2.weight') if k in own]
    return bool(keys) and all(k in state_dict and state_dict[k].shape == own[k].shape for k in keys)


# torchvision's names are ours. An aux_logits=True model keeps fresh auxiliary heads unless the checkpoint's were
# trained for its classes (a PCam checkpoint saved with them), and the 1000-class classifier gives way to a fresh one.
checkpoint_filter_fn = adapt_head_filter('fc', load_aux=_trained_aux)


def _create_googlenet_pcam(variant: str, pretrained: bool = False, **kwargs: Any) -> GoogLeNetPcam:
    check_pretrained_available(variant, pretrained, kwargs, imagenet_tag='tv_in1k')
    return build_model_with_cfg(
        GoogLeNetPcam,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


_PAPER = dict(paper_ids='arXiv:1409.4842', paper_name='Going Deeper with Convolutions')
# torchvision's weights expect inputs scaled to [-1, 1] (its transform_input); here they only initialise a model that
# is fine-tuned on PCam-normalised inputs.

default_cfgs = generate_default_cfgs({
    # ImageNet initialisation: torchvision's GoogLeNet weights (its parameter names are ours), classifiers fresh.
    'googlenet_pcam.tv_in1k': pcam_cfg(
        'fc', 'conv1.conv', url='https://download.pytorch.org/models/googlenet-1378be20.pth',
        license='bsd-3-clause', **_PAPER),
    # PCam-trained weights, not published yet: pretrained=True on this tag explains what to use instead.
    'googlenet_pcam.pcam': pcam_cfg('fc', 'conv1.conv', hf_hub_id=f'{PCAM_HUB_ORG}/googlenet_pcam', **_PAPER),
})


@register_model
def googlenet_pcam(pretrained: bool = False, **kwargs: Any) -> GoogLeNetPcam:
    return _create_googlenet_pcam('googlenet_pcam', pretrained, **kwargs)
