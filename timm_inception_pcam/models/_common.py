"""Pieces shared by the two PCam Inception models: the conv-norm-act block, configs and pretrained handling."""
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers import ConvNormAct

from ..constants import LABEL_NAMES, PCAM_INPUT_SIZE, PCAM_MEAN, PCAM_NUM_CLASSES, PCAM_STD

# Where PCam-trained weights are published: the `.pcam` tags' pretrained_cfg names `<org>/<model>` as hf_hub_id.
PCAM_HUB_ORG = 'timm-inception-pcam'


def make_conv_block(
        norm_layer: str = 'batchnorm2d',
        norm_eps: float = 1e-3,
        bn_eps: float | None = None,
        bn_momentum: float | None = None,
        act_layer: str = 'relu',
) -> partial:
    """ConvNormAct with symmetric 'same'-style padding by default, so that only a stride shrinks a grid.

    Padding never changes parameter shapes, so timm's ImageNet weights still load.
    """
    norm_kwargs: dict[str, float] = dict(eps=bn_eps if bn_eps is not None else norm_eps)
    if bn_momentum is not None:
        norm_kwargs['momentum'] = bn_momentum
    return partial(
        ConvNormAct,
        padding='',
        norm_layer=norm_layer,
        act_layer=act_layer,
        norm_kwargs=norm_kwargs,
        act_kwargs=dict(inplace=True),
    )


def max_pool() -> nn.MaxPool2d:
    """The 3x3 stride-2 max pool of the reduction blocks, padded to halve a grid exactly."""
    return nn.MaxPool2d(3, stride=2, padding=1)


def avg_pool() -> nn.AvgPool2d:
    """The 3x3 stride-1 average pool of the Inception branches."""
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


def check_no_drop_block(drop_block_rate: float | None) -> None:
    if drop_block_rate:
        raise ValueError(f'drop_block_rate={drop_block_rate}: DropBlock is not implemented for the PCam Inception '
                         f'models; use drop_path_rate (Inception-ResNet-v2) or drop_rate (head dropout)')


def pcam_cfg(classifier: str, first_conv: str, **kwargs: Any) -> dict[str, Any]:
    return {
        'num_classes': PCAM_NUM_CLASSES, 'label_names': LABEL_NAMES,
        'input_size': PCAM_INPUT_SIZE, 'pool_size': (3, 3), 'min_input_size': (3, 32, 32),
        'crop_pct': 1.0, 'crop_mode': 'center', 'interpolation': 'bilinear',
        'mean': PCAM_MEAN, 'std': PCAM_STD,
        'first_conv': first_conv, 'classifier': classifier,
        'license': 'apache-2.0', 'paper_ids': 'arXiv:1602.07261',
        'paper_name': 'Inception-v4, Inception-ResNet and the Impact of Residual Connections on Learning',
        'origin_url': 'https://github.com/timm-inception-pcam/timm-inception-pcam',
        **kwargs,
    }


def adapt_head_filter(classifier: str):
    """A pretrained filter that keeps the model's own freshly initialised head when the checkpoint's differs.

    Used for the `tf_in1k` tags: ImageNet weights (1000 classes) load into the 2-class PCam model, head reset.
    """
    def _filter(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        own = model.state_dict()
        for suffix in ('weight', 'bias'):
            key = f'{classifier}.{suffix}'
            if key in state_dict and key in own and state_dict[key].shape != own[key].shape:
                state_dict[key] = own[key]
        return state_dict
    return _filter


def check_pretrained_available(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> None:
    """Refuse `pretrained=True` on a `.pcam` tag whose Hub repo (its pretrained_cfg's hf_hub_id) cannot be reached,
    saying what to use instead. No flag to edit: once the repo holds the weights, they load."""
    tag = kwargs.get('pretrained_cfg')
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    if not pretrained or tag != 'pcam' or overlay.get('file') or overlay.get('state_dict'):
        return
    from huggingface_hub import hf_hub_download
    from timm.models import get_pretrained_cfg

    repo = get_pretrained_cfg(f'{variant}.pcam').hf_hub_id
    try:
        hf_hub_download(repo, 'config.json')
    except Exception as e:  # not found, offline, no network: all mean "cannot load the PCam weights here"
        raise RuntimeError(
            f'{variant}.pcam: PCam-trained weights are not published yet or not reachable at hf-hub:{repo} '
            f'({type(e).__name__}). Use `{variant}.tf_in1k` (ImageNet initialisation, the default for '
            f'pretrained=True) to fine-tune, or train your own: python -m timm_inception_pcam.train --model {variant}'
        ) from e
