"""Pieces shared by the PCam models: the conv-norm-act block, configs, pretrained handling and auxiliary heads."""
import re
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers import ConvNormAct, DropPath
from timm.models import checkpoint
from timm.models._features import feature_take_indices

from ..constants import LABEL_NAMES, PCAM_INPUT_SIZE, PCAM_MEAN, PCAM_NUM_CLASSES, PCAM_STD
from ..errors import CheckpointError, UsageError

__all__ = [
    'AUX_PREFIX', 'PCAM_HUB_ORG', 'LayerTrunk', 'ScaledResidual', 'WeightsUnavailableError',
    'adapt_head_filter', 'check_pretrained_available', 'drop_aux_heads', 'is_aux_key', 'layer_group_matcher',
]

# Where PCam-trained weights are published: the `.pcam` tags' pretrained_cfg names `<org>/<model>` as hf_hub_id.
PCAM_HUB_ORG = 'timm-inception-pcam'
# Every auxiliary-classifier module of every PCam model is a top-level child named `aux` or `aux<N>` (GoogLeNet's
# aux1 / aux2 on 4a / 4d, Inception-v3's aux on the last 17x17 block), so one rule finds their parameters.
AUX_PREFIX = 'aux'
_AUX_KEY = re.compile(rf'^(?:module\.)?{AUX_PREFIX}\d*\.')


class WeightsUnavailableError(CheckpointError, RuntimeError):
    """`pretrained=True` asked for weights that do not exist (yet). A RuntimeError too, as timm's own refusal is."""


def is_aux_key(key: str) -> bool:
    """Is this state-dict key a parameter or buffer of an auxiliary classifier (`aux.*`, `aux1.*`, `aux2.*`)?"""
    return _AUX_KEY.match(key) is not None


def drop_aux_heads(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without the auxiliary classifiers' entries.

    A checkpoint of a model created with `aux_logits=True` then loads strictly into the same model created with
    `aux_logits=False` (evaluation, export), whose forward is unchanged: the auxiliary heads only add outputs.
    """
    return {k: v for k, v in state_dict.items() if not is_aux_key(k)}


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


def check_depths(depths: Any, low: int) -> tuple[int, int, int]:
    """`depths` as three block counts (A, B, C) of at least `low`, or a UsageError saying so."""
    if (not isinstance(depths, (tuple, list)) or len(depths) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= low for d in depths)):
        kind = 'positive' if low > 0 else 'non-negative'
        raise UsageError(f'depths must be three {kind} block counts (A, B, C), e.g. depths=1,1,1; got {depths!r}')
    return tuple(depths)


def check_no_drop_block(drop_block_rate: float | None) -> None:
    if drop_block_rate:
        raise UsageError(f'drop_block_rate={drop_block_rate}: DropBlock is not implemented for the PCam models; '
                         f'use drop_path_rate (Inception-ResNet models) or drop_rate (head dropout)')


def check_no_drop_path(drop_path_rate: float | None, arch: str) -> None:
    """Refuse stochastic depth on an architecture without residual branches, saying what to use instead."""
    if drop_path_rate:
        raise UsageError(f'drop_path_rate={drop_path_rate}: {arch} has no residual branches to drop; use '
                         f'inception_resnet_v2_pcam or inception_resnet_v1_pcam for stochastic depth, or drop_rate '
                         f'for head dropout')


def pcam_cfg(classifier: str, first_conv: str, **kwargs: Any) -> dict[str, Any]:
    """PCam's pretrained config: input, normalisation, labels; `kwargs` add the weights' source or override."""
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


def adapt_head_filter(
        *classifiers: str,
        rename: Callable[[str, torch.Tensor], tuple[str, torch.Tensor]] | None = None,
        load_aux: bool | Callable[[dict[str, torch.Tensor], nn.Module], bool] = True,
) -> Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]:
    """A pretrained filter mapping ImageNet weights onto a PCam model, whose own fresh head replaces theirs.

    `rename` maps a checkpoint's (key, tensor) to the model's layout (torchvision names, say). A classifier whose
    shape differs from the model's (1000 ImageNet classes, 2 here) keeps the model's fresh initialisation; so does
    every auxiliary head in the model that the checkpoint lacks (or whose weights are untrained: `load_aux` False, or
    a callable of the renamed state dict and the model returning False), and the checkpoint's auxiliary heads are
    dropped when the model has none. Everything else must match: the load stays strict.
    """
    def _filter(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        if rename is not None:
            state_dict = dict(rename(k, v) for k, v in state_dict.items())
        own = model.state_dict()
        aux = load_aux(state_dict, model) if callable(load_aux) else load_aux
        state_dict = {k: v for k, v in state_dict.items() if not is_aux_key(k) or (aux and k in own)}
        for key, value in own.items():
            if is_aux_key(key) and key not in state_dict:
                state_dict[key] = value
        heads = [c for c in classifiers if c]
        for key in [f'{c}.{suffix}' for c in heads for suffix in ('weight', 'bias')]:
            if key in state_dict and key in own and state_dict[key].shape != own[key].shape:
                state_dict[key] = own[key]
        return state_dict
    return _filter


def check_pretrained_available(
        variant: str,
        pretrained: bool,
        kwargs: dict[str, Any],
        imagenet_tag: str | None = 'tf_in1k',
) -> None:
    """Refuse `pretrained=True` on a tag without weights, saying what to do instead.

    A `.pcam` tag loads once its Hub repo (the pretrained_cfg's hf_hub_id) holds the weights and refuses while it
    cannot be reached: no flag to edit. A model without ImageNet weights (`imagenet_tag=None`) refuses on its
    weightless default tag. Weights passed in through `pretrained_cfg_overlay` are always accepted.
    """
    tag = kwargs.get('pretrained_cfg')
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    own_weights = bool(overlay.get('file') or overlay.get('state_dict') or overlay.get('url')
                       or overlay.get('hf_hub_id'))
    if not pretrained or own_weights or not (tag is None or isinstance(tag, str)):
        return
    train = f'python -m timm_inception_pcam.train --model {variant}'
    no_imagenet = f'no ImageNet weights exist for this architecture: train it from random initialisation ({train})'
    if tag == 'pcam':
        from huggingface_hub import hf_hub_download
        from timm.models import get_pretrained_cfg

        repo = get_pretrained_cfg(f'{variant}.pcam').hf_hub_id
        try:
            hf_hub_download(repo, 'config.json')
            return
        except Exception as e:  # not found, offline, no network: all mean "cannot load the PCam weights here"
            instead = (f'Use `{variant}.{imagenet_tag}` (ImageNet initialisation, the default for pretrained=True) '
                       f'to fine-tune, or train your own: {train}') if imagenet_tag else f'And {no_imagenet}'
            raise WeightsUnavailableError(
                f'{variant}.pcam: PCam-trained weights are not published yet or not reachable at hf-hub:{repo} '
                f'({type(e).__name__}). {instead}') from e
    if imagenet_tag is None:
        raise WeightsUnavailableError(f'{variant}: pretrained=True, but {no_imagenet}')


class ScaledResidual(nn.Module):
    """Shared tail of the Inception-ResNet blocks: 1x1 linear projection, scale, stochastic depth, add, ReLU.

    Residual scaling is the paper's section 3.3 (1602.07261): scaling the branch down by 0.1 to 0.3 before the
    addition keeps training of wide residual Inception networks stable.
    """

    def __init__(
            self,
            scale: float,
            drop_path: float = 0.,
            apply_act: bool = True,
    ):
        super().__init__()
        self.scale = scale
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.act = nn.ReLU() if apply_act else nn.Identity()

    def residual(self, shortcut: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return self.act(shortcut + self.drop_path(branch * self.scale))


def layer_group_matcher(groups: list[tuple[str, ...]]) -> Callable[[str], float]:
    """A group_matcher callable: a parameter's group is the index of the first group holding a prefix of its name.

    Each group is a tuple of top-level module names (or `name.index`); unmatched parameters go last, with the head.
    """
    def _matcher(param_name: str) -> float:
        for idx, prefixes in enumerate(groups):
            if any(param_name.startswith(prefix + '.') for prefix in prefixes):
                return idx
        return float('inf')
    return _matcher


class LayerTrunk:
    """Mixin for a model whose trunk is top-level layers run in the order of `layer_names`.

    The model sets `layer_names`, `feature_info`, `feature_ends` (index into `layer_names` of each feature tap),
    `aux_taps` (layer name -> name of the auxiliary classifier fed by that layer's output; empty when none),
    `grad_checkpointing`, `num_features` and `head_hidden_size`, and defines `reset_classifier` and a scriptable
    `forward_features` that writes the layers out (it calls `forward_trunk` when checkpointing).
    """
    layer_names: list[str]
    feature_info: list[dict[str, Any]]
    feature_ends: list[int]
    aux_taps: dict[str, str]
    grad_checkpointing: bool

    @torch.jit.unused
    def forward_trunk(
            self,
            x: torch.Tensor,
            with_aux: bool = False,
            take: list[int] | None = None,
            stop: int | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Run the layers up to index `stop` (all if None): (output, outputs of the layers in `take`, aux logits)."""
        intermediates: list[torch.Tensor] = []
        aux: list[torch.Tensor] = []
        names = self.layer_names if stop is None else self.layer_names[:stop + 1]
        for idx, name in enumerate(names):
            layer = getattr(self, name)
            x = checkpoint(layer, x) if self.grad_checkpointing else layer(x)
            if take is not None and idx in take:
                intermediates.append(x)
            if with_aux and name in self.aux_taps:
                aux.append(getattr(self, self.aux_taps[name])(x))
        return x, intermediates, aux

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward features, also returning the outputs of the stages picked by `indices` (last n if int).

        The auxiliary classifiers are not run.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        take_indices, max_index = feature_take_indices(len(self.feature_ends), indices)
        take = [self.feature_ends[i] for i in take_indices]
        stop = self.feature_ends[max_index] if stop_early else None
        x, intermediates, _ = self.forward_trunk(x, take=take, stop=stop)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def remove_aux_heads(self) -> None:
        """Drop the auxiliary classifiers: forward then returns plain logits in training mode too."""
        if not self.aux_taps:
            return
        for name in self.aux_taps.values():
            setattr(self, name, None)
        self.aux_taps = {}
        self.aux_logits = False

    def prune_intermediate_layers(
            self,
            indices: int | list[int] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Replace the layers (and head, auxiliary heads with it) not needed for the picked intermediates."""
        take_indices, max_index = feature_take_indices(len(self.feature_ends), indices)
        prune_end = max_index < len(self.feature_ends) - 1
        for name in self.layer_names[self.feature_ends[max_index] + 1:]:
            setattr(self, name, nn.Identity())
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.remove_aux_heads()
            self.reset_classifier(0, '')
        return take_indices
