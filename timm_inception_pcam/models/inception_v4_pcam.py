""" Inception-v4 for PatchCamelyon (96x96 patches, normal / metastatic)

Paper: `Inception-v4, Inception-ResNet and the Impact of Residual Connections on Learning`
    - https://arxiv.org/abs/1602.07261 (Szegedy et al. 2016), Figures 3-9.

Adapted to PCam: every convolution and pool is padded so that only a stride shrinks a grid, giving the paper's
35 / 17 / 8 proportions at 299 px as 12 / 6 / 3 at 96 px (24 / 12 / 6 with `stem_stride=1`). Parameter names and
shapes follow timm's `inception_v4`, so its ImageNet weights load with only the classifier replaced.
"""
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers import create_classifier, get_device_dtype
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..errors import UsageError
from ._common import (
    PCAM_HUB_ORG,
    adapt_head_filter,
    avg_pool,
    check_depths,
    check_no_drop_block,
    check_no_drop_path,
    check_pretrained_available,
    make_conv_block,
    max_pool,
    pcam_cfg,
)

__all__ = ['InceptionV4Pcam']


class Mixed3a(nn.Module):
    """Stem, first filter concatenation: max pool || 3x3 stride-2 conv."""

    def __init__(self, conv_block: partial, device=None, dtype=None):
        super().__init__()
        self.maxpool = max_pool()
        self.conv = conv_block(64, 96, kernel_size=3, stride=2, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.maxpool(x), self.conv(x)), 1)


class Mixed4a(nn.Module):
    """Stem, second filter concatenation: 1x1 -> 3x3 || 1x1 -> 1x7 -> 7x1 -> 3x3."""

    def __init__(self, conv_block: partial, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.branch0 = nn.Sequential(
            conv_block(160, 64, kernel_size=1, **dd),
            conv_block(64, 96, kernel_size=3, **dd),
        )
        self.branch1 = nn.Sequential(
            conv_block(160, 64, kernel_size=1, **dd),
            conv_block(64, 64, kernel_size=(1, 7), **dd),
            conv_block(64, 64, kernel_size=(7, 1), **dd),
            conv_block(64, 96, kernel_size=3, **dd),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x)), 1)


class Mixed5a(nn.Module):
    """Stem, third filter concatenation: 3x3 stride-2 conv || max pool."""

    def __init__(self, conv_block: partial, device=None, dtype=None):
        super().__init__()
        self.conv = conv_block(192, 192, kernel_size=3, stride=2, device=device, dtype=dtype)
        self.maxpool = max_pool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.conv(x), self.maxpool(x)), 1)


class InceptionA(nn.Module):
    """Figure 4: the 35x35 (here 12x12) block, 384 -> 384 channels."""

    def __init__(self, conv_block: partial, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.branch0 = conv_block(384, 96, kernel_size=1, **dd)
        self.branch1 = nn.Sequential(
            conv_block(384, 64, kernel_size=1, **dd),
            conv_block(64, 96, kernel_size=3, **dd),
        )
        self.branch2 = nn.Sequential(
            conv_block(384, 64, kernel_size=1, **dd),
            conv_block(64, 96, kernel_size=3, **dd),
            conv_block(96, 96, kernel_size=3, **dd),
        )
        self.branch3 = nn.Sequential(avg_pool(), conv_block(384, 96, kernel_size=1, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


class ReductionA(nn.Module):
    """Figure 7 with (k, l, m, n) = (192, 224, 256, 384): 384 -> 1024 channels, grid halved."""

    def __init__(self, conv_block: partial, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.branch0 = conv_block(384, 384, kernel_size=3, stride=2, **dd)
        self.branch1 = nn.Sequential(
            conv_block(384, 192, kernel_size=1, **dd),
            conv_block(192, 224, kernel_size=3, **dd),
            conv_block(224, 256, kernel_size=3, stride=2, **dd),
        )
        self.branch2 = max_pool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)


class InceptionB(nn.Module):
    """Figure 5: the 17x17 (here 6x6) block with factorised 7x7 convolutions, 1024 -> 1024 channels."""

    def __init__(self, conv_block: partial, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.branch0 = conv_block(1024, 384, kernel_size=1, **dd)
        self.branch1 = nn.Sequential(
            conv_block(1024, 192, kernel_size=1, **dd),
            conv_block(192, 224, kernel_size=(1, 7), **dd),
            conv_block(224, 256, kernel_size=(7, 1), **dd),
        )
        self.branch2 = nn.Sequential(
            conv_block(1024, 192, kernel_size=1, **dd),
            conv_block(192, 192, kernel_size=(7, 1), **dd),
            conv_block(192, 224, kernel_size=(1, 7), **dd),
            conv_block(224, 224, kernel_size=(7, 1), **dd),
            conv_block(224, 256, kernel_size=(1, 7), **dd),
        )
        self.branch3 = nn.Sequential(avg_pool(), conv_block(1024, 128, kernel_size=1, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


class ReductionB(nn.Module):
    """Figure 8: 1024 -> 1536 channels, grid halved."""

    def __init__(self, conv_block: partial, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.branch0 = nn.Sequential(
            conv_block(1024, 192, kernel_size=1, **dd),
            conv_block(192, 192, kernel_size=3, stride=2, **dd),
        )
        self.branch1 = nn.Sequential(
            conv_block(1024, 256, kernel_size=1, **dd),
            conv_block(256, 256, kernel_size=(1, 7), **dd),
            conv_block(256, 320, kernel_size=(7, 1), **dd),
            conv_block(320, 320, kernel_size=3, stride=2, **dd),
        )
        self.branch2 = max_pool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)


class InceptionC(nn.Module):
    """Figure 6: the 8x8 (here 3x3) block with split 1x3 / 3x1 outputs, 1536 -> 1536 channels."""

    def __init__(self, conv_block: partial, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.branch0 = conv_block(1536, 256, kernel_size=1, **dd)

        self.branch1_0 = conv_block(1536, 384, kernel_size=1, **dd)
        self.branch1_1a = conv_block(384, 256, kernel_size=(1, 3), **dd)
        self.branch1_1b = conv_block(384, 256, kernel_size=(3, 1), **dd)

        self.branch2_0 = conv_block(1536, 384, kernel_size=1, **dd)
        self.branch2_1 = conv_block(384, 448, kernel_size=(3, 1), **dd)
        self.branch2_2 = conv_block(448, 512, kernel_size=(1, 3), **dd)
        self.branch2_3a = conv_block(512, 256, kernel_size=(1, 3), **dd)
        self.branch2_3b = conv_block(512, 256, kernel_size=(3, 1), **dd)

        self.branch3 = nn.Sequential(avg_pool(), conv_block(1536, 256, kernel_size=1, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.branch1_0(x)
        x2 = self.branch2_2(self.branch2_1(self.branch2_0(x)))
        return torch.cat((
            self.branch0(x),
            self.branch1_1a(x1), self.branch1_1b(x1),
            self.branch2_3a(x2), self.branch2_3b(x2),
            self.branch3(x),
        ), 1)


class InceptionV4Pcam(nn.Module):
    """Inception-v4 on 96x96 PCam patches.

    Args:
        num_classes: Classifier outputs (2: normal, metastatic).
        in_chans: Input channels.
        stem_stride: Stride of the first conv: 2 gives grids 12 / 6 / 3 at 96 px, 1 gives 24 / 12 / 6 (about 4x the
            compute, finer detail).
        depths: Number of Inception-A, -B and -C blocks (paper: 4, 7, 3). Fewer make quick test models.
        drop_rate: Dropout before the classifier (paper: keep 0.8, i.e. 0.2).
        drop_path_rate: Accepted for train.py compatibility; must be 0 (Inception-v4 has no residual branches).
        global_pool: Global pooling type.
        norm_eps, bn_eps, bn_momentum: BatchNorm settings (`bn_*` as passed by timm's train.py override).
    """

    def __init__(
            self,
            num_classes: int = 2,
            in_chans: int = 3,
            stem_stride: int = 2,
            depths: tuple[int, int, int] = (4, 7, 3),
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
        check_no_drop_path(drop_path_rate, 'Inception-v4')
        check_no_drop_block(drop_block_rate)
        depths = check_depths(depths, 1)
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = 1536
        self.grad_checkpointing = False
        conv_block = make_conv_block(norm_layer, norm_eps, bn_eps, bn_momentum, act_layer)

        num_a, num_b, num_c = depths
        features = [
            conv_block(in_chans, 32, kernel_size=3, stride=stem_stride, **dd),
            conv_block(32, 32, kernel_size=3, **dd),
            conv_block(32, 64, kernel_size=3, **dd),
            Mixed3a(conv_block, **dd),
            Mixed4a(conv_block, **dd),
            Mixed5a(conv_block, **dd),
        ]
        features += [InceptionA(conv_block, **dd) for _ in range(num_a)]
        features += [ReductionA(conv_block, **dd)]
        features += [InceptionB(conv_block, **dd) for _ in range(num_b)]
        features += [ReductionB(conv_block, **dd)]
        features += [InceptionC(conv_block, **dd) for _ in range(num_c)]
        self.features = nn.Sequential(*features)

        r = stem_stride  # reduction after the first conv
        stage_ends = [2, 3, 5 + num_a, 6 + num_a + num_b, len(features) - 1]
        self.feature_info = [
            dict(num_chs=chs, reduction=r * mult, module=f'features.{idx}')
            for chs, mult, idx in zip((64, 160, 384, 1024, 1536), (1, 2, 4, 8, 16), stage_ends)
        ]
        self.stage_ends = stage_ends
        self.global_pool, self.head_drop, self.last_linear = create_classifier(
            self.num_features, self.num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r'^features\.[012]\.', blocks=r'^features\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.last_linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.last_linear = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, **get_device_dtype(self))
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.last_linear.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward features, also returning the outputs of the stages picked by `indices` (last n if int)."""
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        take_blocks = [self.stage_ends[i] for i in take_indices]
        last_block = self.stage_ends[max_index]
        blocks = self.features if torch.jit.is_scripting() or not stop_early else self.features[:last_block + 1]

        intermediates = []
        for idx, block in enumerate(blocks):
            x = block(x)
            if idx in take_blocks:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: int | list[int] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Drop the blocks (and head) not needed to produce the intermediates picked by `indices`."""
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        prune_end = max_index < len(self.stage_ends) - 1
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        self.features = self.features[:self.stage_ends[max_index] + 1]
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.features, x)
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.last_linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_inception_v4_pcam(variant: str, pretrained: bool = False, **kwargs: Any) -> InceptionV4Pcam:
    check_pretrained_available(variant, pretrained, kwargs)
    return build_model_with_cfg(
        InceptionV4Pcam,
        variant,
        pretrained,
        pretrained_filter_fn=adapt_head_filter('last_linear'),
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )


default_cfgs = generate_default_cfgs({
    # ImageNet initialisation: timm's TF-ported Inception-v4 weights, classifier replaced by a fresh 2-class head.
    'inception_v4_pcam.tf_in1k': pcam_cfg(
        'last_linear', 'features.0.conv', hf_hub_id='timm/inception_v4.tf_in1k'),
    # PCam-trained weights, not published yet: pretrained=True on this tag explains what to use instead.
    'inception_v4_pcam.pcam': pcam_cfg(
        'last_linear', 'features.0.conv', hf_hub_id=f'{PCAM_HUB_ORG}/inception_v4_pcam'),
})


@register_model
def inception_v4_pcam(pretrained: bool = False, **kwargs: Any) -> InceptionV4Pcam:
    return _create_inception_v4_pcam('inception_v4_pcam', pretrained, **kwargs)
