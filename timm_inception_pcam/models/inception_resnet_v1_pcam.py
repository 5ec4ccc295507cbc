""" Inception-ResNet-v1 for PatchCamelyon (96x96 patches, normal / metastatic)

Paper: `Inception-v4, Inception-ResNet and the Impact of Residual Connections on Learning`
    - https://arxiv.org/abs/1602.07261 (Szegedy et al. 2016), Figures 7 and 10-15, section 3.3 (scaled residuals).

Built as the paper draws it: its own stem (Figure 14), 5 Inception-ResNet-A (Figure 10), Reduction-A (Figure 7 with
k, l, m, n = 192, 192, 256, 384), 10 Inception-ResNet-B (Figure 11), Reduction-B (Figure 12), 5 Inception-ResNet-C
(Figure 13), average pooling (Figure 15). Every convolution and pool is padded so that only a stride shrinks a grid:
the 35 / 17 / 8 grids at 299 px become 12 / 6 / 3 at 96 px (24 / 12 / 6 with `stem_stride=1`). Residual branches
are scaled and support stochastic depth.

No ImageNet weights exist for Inception-ResNet-v1 (none were released with the paper): train it from scratch.
"""
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers import create_classifier, get_device_dtype
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model

from ..errors import UsageError
from ._common import (
    PCAM_HUB_ORG,
    LayerTrunk,
    ScaledResidual,
    adapt_head_filter,
    check_depths,
    check_no_drop_block,
    check_pretrained_available,
    layer_group_matcher,
    make_conv_block,
    max_pool,
    pcam_cfg,
)

__all__ = ['InceptionResnetV1Pcam']


class InceptionResnetA(ScaledResidual):
    """Figure 10, Inception-ResNet-A: the 35x35 (here 12x12) residual block, 256 channels."""

    def __init__(self, conv_block: partial, scale: float = 0.17, drop_path: float = 0., device=None, dtype=None):
        super().__init__(scale, drop_path)
        dd = dict(device=device, dtype=dtype)
        self.branch0 = conv_block(256, 32, kernel_size=1, **dd)
        self.branch1 = nn.Sequential(
            conv_block(256, 32, kernel_size=1, **dd),
            conv_block(32, 32, kernel_size=3, **dd),
        )
        self.branch2 = nn.Sequential(
            conv_block(256, 32, kernel_size=1, **dd),
            conv_block(32, 32, kernel_size=3, **dd),
            conv_block(32, 32, kernel_size=3, **dd),
        )
        self.conv2d = nn.Conv2d(96, 256, kernel_size=1, **dd)  # "1x1 Conv (256 Linear)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d(torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1))
        return self.residual(x, out)


class ReductionA(nn.Module):
    """Figure 7 with (k, l, m, n) = (192, 192, 256, 384) (Table 1): 256 -> 896 channels, grid halved."""

    def __init__(self, conv_block: partial, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.branch0 = conv_block(256, 384, kernel_size=3, stride=2, **dd)
        self.branch1 = nn.Sequential(
            conv_block(256, 192, kernel_size=1, **dd),
            conv_block(192, 192, kernel_size=3, **dd),
            conv_block(192, 256, kernel_size=3, stride=2, **dd),
        )
        self.branch2 = max_pool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)


class InceptionResnetB(ScaledResidual):
    """Figure 11, Inception-ResNet-B: the 17x17 (here 6x6) residual block with a factorised 7x7, 896 channels."""

    def __init__(self, conv_block: partial, scale: float = 0.10, drop_path: float = 0., device=None, dtype=None):
        super().__init__(scale, drop_path)
        dd = dict(device=device, dtype=dtype)
        self.branch0 = conv_block(896, 128, kernel_size=1, **dd)
        self.branch1 = nn.Sequential(
            conv_block(896, 128, kernel_size=1, **dd),
            conv_block(128, 128, kernel_size=(1, 7), **dd),
            conv_block(128, 128, kernel_size=(7, 1), **dd),
        )
        self.conv2d = nn.Conv2d(256, 896, kernel_size=1, **dd)  # "1x1 Conv (896 Linear)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d(torch.cat((self.branch0(x), self.branch1(x)), 1))
        return self.residual(x, out)


class ReductionB(nn.Module):
    """Figure 12, Reduction-B: 896 -> 1792 channels, grid halved."""

    def __init__(self, conv_block: partial, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.branch0 = nn.Sequential(
            conv_block(896, 256, kernel_size=1, **dd),
            conv_block(256, 384, kernel_size=3, stride=2, **dd),
        )
        self.branch1 = nn.Sequential(
            conv_block(896, 256, kernel_size=1, **dd),
            conv_block(256, 256, kernel_size=3, stride=2, **dd),
        )
        self.branch2 = nn.Sequential(
            conv_block(896, 256, kernel_size=1, **dd),
            conv_block(256, 256, kernel_size=3, **dd),
            conv_block(256, 256, kernel_size=3, stride=2, **dd),
        )
        self.branch3 = max_pool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


class InceptionResnetC(ScaledResidual):
    """Figure 13, Inception-ResNet-C: the 8x8 (here 3x3) residual block with 1x3 / 3x1, 1792 channels."""

    def __init__(self, conv_block: partial, scale: float = 0.20, drop_path: float = 0., device=None, dtype=None):
        super().__init__(scale, drop_path)
        dd = dict(device=device, dtype=dtype)
        self.branch0 = conv_block(1792, 192, kernel_size=1, **dd)
        self.branch1 = nn.Sequential(
            conv_block(1792, 192, kernel_size=1, **dd),
            conv_block(192, 192, kernel_size=(1, 3), **dd),
            conv_block(192, 192, kernel_size=(3, 1), **dd),
        )
        self.conv2d = nn.Conv2d(384, 1792, kernel_size=1, **dd)  # "1x1 Conv (1792 Linear)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d(torch.cat((self.branch0(x), self.branch1(x)), 1))
        return self.residual(x, out)


class InceptionResnetV1Pcam(LayerTrunk, nn.Module):
    """Inception-ResNet-v1 on 96x96 PCam patches.

    Args:
        num_classes: Classifier outputs (2: normal, metastatic).
        in_chans: Input channels.
        stem_stride: Stride of the first conv: 2 gives grids 12 / 6 / 3 at 96 px, 1 gives 24 / 12 / 6.
        depths: Number of Inception-ResNet-A, -B and -C blocks (paper, Figure 15: 5, 10, 5).
        scales: Residual scales of the A, B and C blocks (paper, section 3.3: 0.1 to 0.3).
        drop_rate: Dropout before the classifier (Figure 15: keep 0.8, i.e. 0.2).
        drop_path_rate: Stochastic depth, rising linearly over the residual blocks to this rate.
        global_pool: Global pooling type.
        norm_eps, bn_eps, bn_momentum: BatchNorm settings (`bn_*` as passed by timm's train.py override).
    """

    def __init__(
            self,
            num_classes: int = 2,
            in_chans: int = 3,
            stem_stride: int = 2,
            depths: tuple[int, int, int] = (5, 10, 5),
            scales: tuple[float, float, float] = (0.17, 0.10, 0.20),
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
        depths = check_depths(depths, 0)
        if len(scales) != 3:
            raise UsageError(f'scales must be three residual scales (A, B, C), got {scales}')
        check_no_drop_block(drop_block_rate)
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = 1792
        self.grad_checkpointing = False
        conv_block = make_conv_block(norm_layer, norm_eps, bn_eps, bn_momentum, act_layer)
        num_a, num_b, num_c = depths
        num_blocks = num_a + num_b + num_c
        dpr = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]  # no tensors: meta-safe
        dpr_a, dpr_b, dpr_c = dpr[:num_a], dpr[num_a:num_a + num_b], dpr[num_a + num_b:]
        r = stem_stride

        # Figure 14, the stem: 299x299 -> 35x35x256 in the paper, 96x96 -> 12x12x256 here
        self.conv2d_1a = conv_block(in_chans, 32, kernel_size=3, stride=stem_stride, **dd)
        self.conv2d_2a = conv_block(32, 32, kernel_size=3, **dd)
        self.conv2d_2b = conv_block(32, 64, kernel_size=3, **dd)
        self.maxpool_3a = max_pool()
        self.conv2d_3b = conv_block(64, 80, kernel_size=1, **dd)
        self.conv2d_4a = conv_block(80, 192, kernel_size=3, **dd)
        self.conv2d_4b = conv_block(192, 256, kernel_size=3, stride=2, **dd)
        self.repeat = nn.Sequential(*[InceptionResnetA(conv_block, scales[0], p, **dd) for p in dpr_a])
        self.mixed_6a = ReductionA(conv_block, **dd)
        self.repeat_1 = nn.Sequential(*[InceptionResnetB(conv_block, scales[1], p, **dd) for p in dpr_b])
        self.mixed_7a = ReductionB(conv_block, **dd)
        self.repeat_2 = nn.Sequential(*[InceptionResnetC(conv_block, scales[2], p, **dd) for p in dpr_c])

        self.layer_names = [
            'conv2d_1a', 'conv2d_2a', 'conv2d_2b', 'maxpool_3a', 'conv2d_3b', 'conv2d_4a', 'conv2d_4b',
            'repeat', 'mixed_6a', 'repeat_1', 'mixed_7a', 'repeat_2',
        ]
        self.feature_info = [
            dict(num_chs=64, reduction=r, module='conv2d_2b'),
            dict(num_chs=192, reduction=2 * r, module='conv2d_4a'),
            dict(num_chs=256, reduction=4 * r, module='repeat' if num_a else 'conv2d_4b'),
            dict(num_chs=896, reduction=8 * r, module='repeat_1' if num_b else 'mixed_6a'),
            dict(num_chs=self.num_features, reduction=16 * r, module='repeat_2' if num_c else 'mixed_7a'),
        ]
        self.feature_ends = [self.layer_names.index(info['module']) for info in self.feature_info]
        self.aux_taps = {}
        self.global_pool, self.head_drop, self.classif = create_classifier(
            self.num_features, self.num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """Parameter groups in forward order: stem, then each residual block (each repeat when coarse)."""
        groups: list[tuple[str, ...]] = [('conv2d_1a', 'conv2d_2a', 'conv2d_2b', 'conv2d_3b', 'conv2d_4a', 'conv2d_4b')]
        for name in ('repeat', 'mixed_6a', 'repeat_1', 'mixed_7a', 'repeat_2'):
            module = getattr(self, name)
            if isinstance(module, nn.Sequential) and not coarse:
                groups += [(f'{name}.{i}',) for i in range(len(module))]
            else:
                groups.append((name,))
        return layer_group_matcher(groups)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classif

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.classif = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, **get_device_dtype(self))
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.classif.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2d_1a(x)
        x = self.conv2d_2a(x)
        x = self.conv2d_2b(x)
        x = self.maxpool_3a(x)
        x = self.conv2d_3b(x)
        x = self.conv2d_4a(x)
        x = self.conv2d_4b(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.repeat, x)
            x = self.mixed_6a(x)
            x = checkpoint_seq(self.repeat_1, x)
            x = self.mixed_7a(x)
            x = checkpoint_seq(self.repeat_2, x)
        else:
            x = self.repeat(x)
            x = self.mixed_6a(x)
            x = self.repeat_1(x)
            x = self.mixed_7a(x)
            x = self.repeat_2(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.classif(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_inception_resnet_v1_pcam(variant: str, pretrained: bool = False, **kwargs: Any) -> InceptionResnetV1Pcam:
    check_pretrained_available(variant, pretrained, kwargs, imagenet_tag=None)
    return build_model_with_cfg(
        InceptionResnetV1Pcam,
        variant,
        pretrained,
        pretrained_filter_fn=adapt_head_filter('classif'),
        **kwargs,
    )


default_cfgs = generate_default_cfgs({
    # PCam-trained weights, not published yet: pretrained=True on this tag explains what to use instead.
    'inception_resnet_v1_pcam.pcam': pcam_cfg(
        'classif', 'conv2d_1a.conv', hf_hub_id=f'{PCAM_HUB_ORG}/inception_resnet_v1_pcam'),
    # The default, untagged ('*' makes it the default although listed after a tag with weights): no weights source,
    # as no ImageNet weights exist for Inception-ResNet-v1; pretrained=True refuses and says so.
    'inception_resnet_v1_pcam.*': pcam_cfg('classif', 'conv2d_1a.conv'),
})


@register_model
def inception_resnet_v1_pcam(pretrained: bool = False, **kwargs: Any) -> InceptionResnetV1Pcam:
    return _create_inception_resnet_v1_pcam('inception_resnet_v1_pcam', pretrained, **kwargs)
