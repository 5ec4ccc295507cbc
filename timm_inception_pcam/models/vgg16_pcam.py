""" VGG16 for PatchCamelyon (96x96 patches, normal / metastatic)

Paper: `Very Deep Convolutional Networks for Large-Scale Image Recognition`
    - https://arxiv.org/abs/1409.1556 (Simonyan & Zisserman 2014), Table 1 column D and section 3.2.

The 13 convolutions of configuration D are padded 3x3 convolutions and only the five 2x2 max pools shrink a grid:
the stages work on 96 / 48 / 24 / 12 / 6 grids at 96 px and the features leave on a 3x3 grid (7x7 at 224 px).
The fully-connected layers run as convolutions (section 3.2: FC-4096 as a 7x7 convolution, the next as 1x1). At
224 px the 7x7 one sees the whole 7x7 grid once; at 96 px it is zero-padded to keep the 3x3 grid, so each of its 9
outputs sees the patch at one placement inside the 7x7 window (the ImageNet weights then meet the patch at the
pixel scale they were trained on), and the head averages them. timm's `vgg16` instead stretches a 3x3 grid to 7x7
(an adaptive average pool) before a single 7x7 window. Parameter names and shapes follow timm's `vgg16` /
`vgg16_bn`, so their torchvision ImageNet weights (`tv_in1k`) load with only the classifier replaced.
`vgg16_bn_pcam` adds BatchNorm after every convolution (torchvision's variant; not in the paper).
"""
from typing import Any

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, get_device_dtype
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..errors import UsageError
from ._common import (
    PCAM_HUB_ORG,
    adapt_head_filter,
    check_no_drop_block,
    check_no_drop_path,
    check_pretrained_available,
    pcam_cfg,
)

__all__ = ['VggPcam']

# Table 1, configuration D (16 weight layers): conv3-<width> per entry, 'M' a 2x2 stride-2 max pool.
CONFIG_D: tuple[int | str, ...] = (
    64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M')


class FcAsConv(nn.Module):
    """Table 1's FC-4096, FC-4096 as convolutions (section 3.2): 7x7 then 1x1, each followed by ReLU.

    The 7x7 one is padded by 3 so that it keeps the grid it is given (3x3 at 96 px).
    """

    def __init__(self, in_chs: int = 512, hidden: int = 4096, drop_rate: float = 0., device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.fc1 = nn.Conv2d(in_chs, hidden, kernel_size=7, padding=3, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate)
        self.fc2 = nn.Conv2d(hidden, hidden, kernel_size=1, **dd)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.fc2(self.drop(self.act1(self.fc1(x)))))


class VggPcam(nn.Module):
    """VGG16 (configuration D) on 96x96 PCam patches.

    Args:
        num_classes: Classifier outputs (2: normal, metastatic).
        in_chans: Input channels.
        batch_norm: BatchNorm after every convolution (`vgg16_bn_pcam`).
        drop_rate: Dropout after the first FC layer and before the classifier (paper: 0.5).
        drop_path_rate: Accepted for train.py compatibility; must be 0 (no residual branches).
        global_pool: Global pooling type.
        bn_eps, bn_momentum: BatchNorm settings (`batch_norm=True` only), as timm's train.py passes them.
    """

    def __init__(
            self,
            num_classes: int = 2,
            in_chans: int = 3,
            batch_norm: bool = False,
            output_stride: int = 32,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            drop_block_rate: float | None = None,
            global_pool: str = 'avg',
            bn_eps: float | None = None,
            bn_momentum: float | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if output_stride != 32:
            raise UsageError(f'output_stride must be 32, got {output_stride}')
        if not batch_norm and (bn_eps is not None or bn_momentum is not None):
            raise UsageError(f'bn_eps={bn_eps}, bn_momentum={bn_momentum}: vgg16_pcam has no BatchNorm layers; '
                             f'use vgg16_bn_pcam, or leave them unset')
        check_no_drop_path(drop_path_rate, 'VGG16')
        check_no_drop_block(drop_block_rate)
        dd = dict(device=device, dtype=dtype)
        norm_kwargs: dict[str, float] = {}
        if bn_eps is not None:
            norm_kwargs['eps'] = bn_eps
        if bn_momentum is not None:
            norm_kwargs['momentum'] = bn_momentum
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.grad_checkpointing = False

        layers: list[nn.Module] = []
        self.feature_info = []
        self.stage_ends = []  # index into self.features of each feature tap
        prev_chs, reduction = in_chans, 1
        for v in CONFIG_D:
            if v == 'M':
                tap = len(layers) - 1
                self.stage_ends.append(tap)
                self.feature_info.append(dict(num_chs=prev_chs, reduction=reduction, module=f'features.{tap}'))
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                reduction *= 2
                continue
            layers.append(nn.Conv2d(prev_chs, int(v), kernel_size=3, padding=1, **dd))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(v), **norm_kwargs, **dd))
            layers.append(nn.ReLU(inplace=True))
            prev_chs = int(v)
        self.features = nn.Sequential(*layers)
        self.feature_info.append(dict(num_chs=prev_chs, reduction=reduction, module=f'features.{len(layers) - 1}'))
        self.stage_ends.append(len(layers) - 1)

        self.num_features = prev_chs  # 512
        self.pre_logits = FcAsConv(prev_chs, 4096, drop_rate=drop_rate, **dd)
        self.head = ClassifierHead(4096, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.head_hidden_size = self.head.num_features
        self._init_weights()

    def _init_weights(self) -> None:
        """He initialisation for the convolutions (VGG16 without BatchNorm does not train from PyTorch's default)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r'^features\.0\.', blocks=r'^features\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, **get_device_dtype(self))
        self.head_hidden_size = self.head.num_features

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward features, also returning the taps picked by `indices` (last n if int).

        Taps 0-4 are the five conv stages (before each max pool: 96 / 48 / 24 / 12 / 6 at 96 px), tap 5 the final
        max pool (3x3, the forward_features output).
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        take_layers = [self.stage_ends[i] for i in take_indices]
        layers = self.features if torch.jit.is_scripting() or not stop_early else \
            self.features[:self.stage_ends[max_index] + 1]
        intermediates = []
        for idx, layer in enumerate(layers):
            x = layer(x)
            if idx in take_layers:
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
        """Drop the layers (and the FC layers with the head) not needed for the taps picked by `indices`."""
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        prune_end = max_index < len(self.stage_ends) - 1
        self.features = self.features[:self.stage_ends[max_index] + 1]
        if prune_end:
            self.num_features = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.pre_logits = nn.Identity()
            self.head = ClassifierHead(self.num_features, 0, pool_type='', drop_rate=self.head.drop.p,
                                       **get_device_dtype(self))
            self.head.train(self.training)
            self.head_hidden_size = self.num_features
            self.num_classes = 0
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            # one checkpoint per stage: a segment must not end on a conv whose in-place ReLU is in the next one
            start = 0
            for end, layer in enumerate(self.features, 1):
                if isinstance(layer, nn.MaxPool2d) or end == len(self.features):
                    x = checkpoint(self.features[start:end], x)
                    start = end
            return x
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(x)
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _from_torchvision(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """torchvision's linear classifier layers as our convolutions; timm-layout keys pass unchanged."""
    if key.startswith('classifier.0.'):
        return 'pre_logits.fc1.' + key[13:], value.reshape(-1, 512, 7, 7) if value.ndim == 2 else value
    if key.startswith('classifier.3.'):
        return 'pre_logits.fc2.' + key[13:], value.reshape(*value.shape, 1, 1) if value.ndim == 2 else value
    if key.startswith('classifier.6.'):
        return 'head.fc.' + key[13:], value
    return key, value


# timm's or torchvision's layout; the 1000-class classifier gives way to a fresh 2-class one.
checkpoint_filter_fn = adapt_head_filter('head.fc', rename=_from_torchvision)


def _create_vgg_pcam(variant: str, pretrained: bool = False, **kwargs: Any) -> VggPcam:
    check_pretrained_available(variant, pretrained, kwargs, imagenet_tag='tv_in1k')
    # features_only: the six taps as timm's vgg (five conv stages, then the last max pool)
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3, 4, 5))
    return build_model_with_cfg(
        VggPcam,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return pcam_cfg('head.fc', 'features.0', paper_ids='arXiv:1409.1556',
                    paper_name='Very Deep Convolutional Networks for Large-Scale Image Recognition', **kwargs)


default_cfgs = generate_default_cfgs({
    # ImageNet initialisation: timm's copies of torchvision's weights, classifier replaced by a fresh 2-class head.
    'vgg16_pcam.tv_in1k': _cfg(hf_hub_id='timm/vgg16.tv_in1k', license='bsd-3-clause'),
    'vgg16_pcam.pcam': _cfg(hf_hub_id=f'{PCAM_HUB_ORG}/vgg16_pcam'),
    'vgg16_bn_pcam.tv_in1k': _cfg(hf_hub_id='timm/vgg16_bn.tv_in1k', license='bsd-3-clause'),
    'vgg16_bn_pcam.pcam': _cfg(hf_hub_id=f'{PCAM_HUB_ORG}/vgg16_bn_pcam'),
})


@register_model
def vgg16_pcam(pretrained: bool = False, **kwargs: Any) -> VggPcam:
    return _create_vgg_pcam('vgg16_pcam', pretrained, **kwargs)


@register_model
def vgg16_bn_pcam(pretrained: bool = False, **kwargs: Any) -> VggPcam:
    return _create_vgg_pcam('vgg16_bn_pcam', pretrained, batch_norm=True, **kwargs)
