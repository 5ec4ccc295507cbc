""" Inception-v3 for PatchCamelyon (96x96 patches, normal / metastatic)

Paper: `Rethinking the Inception Architecture for Computer Vision`
    - https://arxiv.org/abs/1512.00567 (Szegedy et al. 2015), Table 1 and Figures 5-8 and 10.

Adapted to PCam: every convolution and pool is padded so that only a stride shrinks a grid, giving the paper's
35 / 17 / 8 grids at 299 px as 12 / 6 / 3 at 96 px (24 / 12 / 6 with `stem_stride=1`). The block widths and the stem
follow the TensorFlow release (as timm's and torchvision's `inception_v3` do), and parameter names and shapes follow
timm's `inception_v3`, so its ImageNet weights (`tv_in1k`, `tf_in1k`, `gluon_in1k`) load with only the classifiers
replaced; the one rename is timm's `AuxLogits` -> `aux`. The auxiliary classifier (Figure 8) on the last 6x6 block
exists only with `aux_logits=True`; in training mode `forward` then returns `(logits, (aux,))`.
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
    AUX_PREFIX,
    PCAM_HUB_ORG,
    LayerTrunk,
    adapt_head_filter,
    avg_pool,
    check_no_drop_block,
    check_no_drop_path,
    check_pretrained_available,
    layer_group_matcher,
    make_conv_block,
    max_pool,
    pcam_cfg,
)

__all__ = ['InceptionV3Pcam']


class InceptionFig5(nn.Module):
    """Figure 5, the 35x35 (here 12x12) module: 1x1 || 1x1 -> 5x5 || 1x1 -> 3x3 -> 3x3 || avg pool -> 1x1.

    The release keeps a 5x5 branch beside the two stacked 3x3 convolutions that Figure 5 factorises it into.
    """

    def __init__(self, conv_block: partial, in_chs: int, pool_features: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.branch1x1 = conv_block(in_chs, 64, kernel_size=1, **dd)
        self.branch5x5_1 = conv_block(in_chs, 48, kernel_size=1, **dd)
        self.branch5x5_2 = conv_block(48, 64, kernel_size=5, **dd)
        self.branch3x3dbl_1 = conv_block(in_chs, 64, kernel_size=1, **dd)
        self.branch3x3dbl_2 = conv_block(64, 96, kernel_size=3, **dd)
        self.branch3x3dbl_3 = conv_block(96, 96, kernel_size=3, **dd)
        self.pool = avg_pool()
        self.branch_pool = conv_block(in_chs, pool_features, kernel_size=1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(self.pool(x)),
        ), 1)


class ReductionFig10a(nn.Module):
    """Figure 10, grid reduction 35x35 -> 17x17 (here 12 -> 6): 3x3/2 || 1x1 -> 3x3 -> 3x3/2 || max pool /2."""

    def __init__(self, conv_block: partial, in_chs: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.branch3x3 = conv_block(in_chs, 384, kernel_size=3, stride=2, **dd)
        self.branch3x3dbl_1 = conv_block(in_chs, 64, kernel_size=1, **dd)
        self.branch3x3dbl_2 = conv_block(64, 96, kernel_size=3, **dd)
        self.branch3x3dbl_3 = conv_block(96, 96, kernel_size=3, stride=2, **dd)
        self.pool = max_pool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.pool(x),
        ), 1)


class InceptionFig6(nn.Module):
    """Figure 6 with n = 7, the 17x17 (here 6x6) module: 1x7 / 7x1 factorised 7x7 convolutions, 768 channels."""

    def __init__(self, conv_block: partial, in_chs: int, channels_7x7: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        c7 = channels_7x7
        self.branch1x1 = conv_block(in_chs, 192, kernel_size=1, **dd)
        self.branch7x7_1 = conv_block(in_chs, c7, kernel_size=1, **dd)
        self.branch7x7_2 = conv_block(c7, c7, kernel_size=(1, 7), **dd)
        self.branch7x7_3 = conv_block(c7, 192, kernel_size=(7, 1), **dd)
        self.branch7x7dbl_1 = conv_block(in_chs, c7, kernel_size=1, **dd)
        self.branch7x7dbl_2 = conv_block(c7, c7, kernel_size=(7, 1), **dd)
        self.branch7x7dbl_3 = conv_block(c7, c7, kernel_size=(1, 7), **dd)
        self.branch7x7dbl_4 = conv_block(c7, c7, kernel_size=(7, 1), **dd)
        self.branch7x7dbl_5 = conv_block(c7, 192, kernel_size=(1, 7), **dd)
        self.pool = avg_pool()
        self.branch_pool = conv_block(in_chs, 192, kernel_size=1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_2(self.branch7x7dbl_1(x))
        b7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(b7dbl)))
        return torch.cat((self.branch1x1(x), b7, b7dbl, self.branch_pool(self.pool(x))), 1)


class ReductionFig10b(nn.Module):
    """Figure 10-style grid reduction 17x17 -> 8x8 (here 6 -> 3), with a factorised 7x7 before its 3x3/2."""

    def __init__(self, conv_block: partial, in_chs: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.branch3x3_1 = conv_block(in_chs, 192, kernel_size=1, **dd)
        self.branch3x3_2 = conv_block(192, 320, kernel_size=3, stride=2, **dd)
        self.branch7x7x3_1 = conv_block(in_chs, 192, kernel_size=1, **dd)
        self.branch7x7x3_2 = conv_block(192, 192, kernel_size=(1, 7), **dd)
        self.branch7x7x3_3 = conv_block(192, 192, kernel_size=(7, 1), **dd)
        self.branch7x7x3_4 = conv_block(192, 192, kernel_size=3, stride=2, **dd)
        self.pool = max_pool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(b7))
        return torch.cat((self.branch3x3_2(self.branch3x3_1(x)), b7, self.pool(x)), 1)


class InceptionFig7(nn.Module):
    """Figure 7, the 8x8 (here 3x3) module with expanded filter-bank outputs (1x3 || 3x1 splits)."""

    def __init__(self, conv_block: partial, in_chs: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.branch1x1 = conv_block(in_chs, 320, kernel_size=1, **dd)
        self.branch3x3_1 = conv_block(in_chs, 384, kernel_size=1, **dd)
        self.branch3x3_2a = conv_block(384, 384, kernel_size=(1, 3), **dd)
        self.branch3x3_2b = conv_block(384, 384, kernel_size=(3, 1), **dd)
        self.branch3x3dbl_1 = conv_block(in_chs, 448, kernel_size=1, **dd)
        self.branch3x3dbl_2 = conv_block(448, 384, kernel_size=3, **dd)
        self.branch3x3dbl_3a = conv_block(384, 384, kernel_size=(1, 3), **dd)
        self.branch3x3dbl_3b = conv_block(384, 384, kernel_size=(3, 1), **dd)
        self.pool = avg_pool()
        self.branch_pool = conv_block(in_chs, 192, kernel_size=1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat((
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl),
            self.branch_pool(self.pool(x)),
        ), 1)


class AuxClassifierFig8(nn.Module):
    """Figure 8, the auxiliary classifier on the last 17x17 (here 6x6) block: pool, 1x1 conv, 5x5 conv, linear.

    The release's 5x5 stride-3 average pool gives a 5x5 grid at 299 px (and collapses to 1x1 at 96 px, too small
    for the 5x5 convolution); an adaptive pool to 5x5 gives the grid the unpadded 5x5 convolution expects at any size.
    """

    def __init__(self, conv_block: partial, in_chs: int, num_classes: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv0 = conv_block(in_chs, 128, kernel_size=1, **dd)
        self.conv1 = conv_block(128, 768, kernel_size=5, padding=0, **dd)
        self.fc = nn.Linear(768, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int) -> None:
        self.fc = nn.Linear(768, num_classes, **get_device_dtype(self)) if num_classes > 0 else nn.Identity()
        self.fc.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.conv0(F.adaptive_avg_pool2d(x, (5, 5))))
        return self.fc(torch.flatten(x, 1))


class InceptionV3Pcam(LayerTrunk, nn.Module):
    """Inception-v3 on 96x96 PCam patches.

    Args:
        num_classes: Classifier outputs (2: normal, metastatic).
        in_chans: Input channels.
        stem_stride: Stride of the first conv: 2 gives grids 12 / 6 / 3 at 96 px, 1 gives 24 / 12 / 6.
        aux_logits: Add the auxiliary classifier (Figure 8) on the last 6x6 block. In training mode `forward` then
            returns `(logits, (aux,))`; in eval mode, and always under TorchScript, plain logits.
        drop_rate: Dropout before the classifier.
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
        check_no_drop_path(drop_path_rate, 'Inception-v3')
        check_no_drop_block(drop_block_rate)
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.aux_logits = aux_logits
        self.grad_checkpointing = False
        conv_block = make_conv_block(norm_layer, norm_eps, bn_eps, bn_momentum, act_layer)

        self.Conv2d_1a_3x3 = conv_block(in_chans, 32, kernel_size=3, stride=stem_stride, **dd)
        self.Conv2d_2a_3x3 = conv_block(32, 32, kernel_size=3, **dd)
        self.Conv2d_2b_3x3 = conv_block(32, 64, kernel_size=3, **dd)
        self.Pool1 = max_pool()
        self.Conv2d_3b_1x1 = conv_block(64, 80, kernel_size=1, **dd)
        self.Conv2d_4a_3x3 = conv_block(80, 192, kernel_size=3, **dd)
        self.Pool2 = max_pool()
        self.Mixed_5b = InceptionFig5(conv_block, 192, pool_features=32, **dd)
        self.Mixed_5c = InceptionFig5(conv_block, 256, pool_features=64, **dd)
        self.Mixed_5d = InceptionFig5(conv_block, 288, pool_features=64, **dd)
        self.Mixed_6a = ReductionFig10a(conv_block, 288, **dd)
        self.Mixed_6b = InceptionFig6(conv_block, 768, channels_7x7=128, **dd)
        self.Mixed_6c = InceptionFig6(conv_block, 768, channels_7x7=160, **dd)
        self.Mixed_6d = InceptionFig6(conv_block, 768, channels_7x7=160, **dd)
        self.Mixed_6e = InceptionFig6(conv_block, 768, channels_7x7=192, **dd)
        self.Mixed_7a = ReductionFig10b(conv_block, 768, **dd)
        self.Mixed_7b = InceptionFig7(conv_block, 1280, **dd)
        self.Mixed_7c = InceptionFig7(conv_block, 2048, **dd)
        self.num_features = 2048

        self.layer_names = [
            'Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3', 'Pool1', 'Conv2d_3b_1x1', 'Conv2d_4a_3x3', 'Pool2',
            'Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e',
            'Mixed_7a', 'Mixed_7b', 'Mixed_7c',
        ]
        r = stem_stride
        self.feature_info = [
            dict(num_chs=64, reduction=r, module='Conv2d_2b_3x3'),
            dict(num_chs=192, reduction=2 * r, module='Conv2d_4a_3x3'),
            dict(num_chs=288, reduction=4 * r, module='Mixed_5d'),
            dict(num_chs=768, reduction=8 * r, module='Mixed_6e'),
            dict(num_chs=self.num_features, reduction=16 * r, module='Mixed_7c'),
        ]
        self.feature_ends = [self.layer_names.index(info['module']) for info in self.feature_info]
        self.global_pool, self.head_drop, self.fc = create_classifier(
            self.num_features, self.num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

        # registered last, so that features_only (which keeps the modules up to the last feature tap) leaves it out
        self.aux_taps = {'Mixed_6e': AUX_PREFIX} if aux_logits else {}
        self.aux = AuxClassifierFig8(conv_block, 768, num_classes, **dd) if aux_logits else None

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """Parameter groups in forward order: two stem groups, then each Mixed block (Mixed_6e with the aux head)."""
        blocks = [(name, self.aux_taps[name]) if name in self.aux_taps else (name,)
                  for name in self.layer_names if name.startswith('Mixed')]
        return layer_group_matcher([('Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3'),
                                    ('Conv2d_3b_1x1', 'Conv2d_4a_3x3'), *blocks])

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
        if self.aux is not None:
            self.aux.reset(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self.forward_trunk(x)[0]
        x = self.Pool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.Pool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        return self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor]]:
        """Logits; with `aux_logits=True` in training mode (eager, FX), `(logits, (aux,))`."""
        if self.aux_logits and self.training and not torch.jit.is_scripting():
            x, _, aux = self.forward_trunk(x, with_aux=True)
            return self.forward_head(x), (aux[0],)
        return self.forward_head(self.forward_features(x))


def _from_timm(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """timm's (and torchvision's) `AuxLogits.*` is our `aux.*`; every other name is the same."""
    return (AUX_PREFIX + key[len('AuxLogits'):] if key.startswith('AuxLogits.') else key), value


# timm's names (AuxLogits -> aux); the 1000-class classifiers give way to fresh 2-class ones.
checkpoint_filter_fn = adapt_head_filter('fc', f'{AUX_PREFIX}.fc', rename=_from_timm)


def _create_inception_v3_pcam(variant: str, pretrained: bool = False, **kwargs: Any) -> InceptionV3Pcam:
    check_pretrained_available(variant, pretrained, kwargs, imagenet_tag='tv_in1k')
    return build_model_with_cfg(
        InceptionV3Pcam,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


_PAPER = dict(paper_ids='arXiv:1512.00567', paper_name='Rethinking the Inception Architecture for Computer Vision')

default_cfgs = generate_default_cfgs({
    # ImageNet initialisation from timm's hub repos, classifiers replaced by fresh 2-class heads. Only tv_in1k carries
    # a trained auxiliary classifier (loaded when aux_logits=True); with the others a fresh one is initialised.
    'inception_v3_pcam.tv_in1k': pcam_cfg(
        'fc', 'Conv2d_1a_3x3.conv', hf_hub_id='timm/inception_v3.tv_in1k', **_PAPER),
    'inception_v3_pcam.tf_in1k': pcam_cfg('fc', 'Conv2d_1a_3x3.conv', hf_hub_id='timm/inception_v3.tf_in1k', **_PAPER),
    'inception_v3_pcam.gluon_in1k': pcam_cfg(
        'fc', 'Conv2d_1a_3x3.conv', hf_hub_id='timm/inception_v3.gluon_in1k', **_PAPER),
    # PCam-trained weights, not published yet: pretrained=True on this tag explains what to use instead.
    'inception_v3_pcam.pcam': pcam_cfg(
        'fc', 'Conv2d_1a_3x3.conv', hf_hub_id=f'{PCAM_HUB_ORG}/inception_v3_pcam', **_PAPER),
})


@register_model
def inception_v3_pcam(pretrained: bool = False, **kwargs: Any) -> InceptionV3Pcam:
    return _create_inception_v3_pcam('inception_v3_pcam', pretrained, **kwargs)
