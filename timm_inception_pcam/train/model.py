"""The model a run trains: from pretrained weights when they can be had, an initial checkpoint, or random init."""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn

from ..checkpoint import (
    CheckpointError,
    ModelArgumentError,
    check_pretrained_tag,
    create_model,
    load_model,
    model_kwargs_of,
    read_checkpoint,
)
from .config import TrainConfig, TrainError

__all__ = ['architecture_kwargs', 'create_train_model']

_logger = logging.getLogger(__name__)


def architecture_kwargs(cfg: TrainConfig, stored: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The create_model keyword arguments that define the run's architecture (stored in every checkpoint):
    `stored` (those of --initial-checkpoint or --resume), overridden by the configuration's."""
    kwargs: dict[str, Any] = {**(stored or {}), 'num_classes': cfg.num_classes}
    if cfg.drop is not None:
        kwargs['drop_rate'] = cfg.drop
    if cfg.drop_path is not None:
        kwargs['drop_path_rate'] = cfg.drop_path
    kwargs.update(cfg.model_kwargs)
    return kwargs


def _offline() -> bool:
    return os.environ.get('HF_HUB_OFFLINE', '0').strip().lower() in ('1', 'true', 'yes', 'on')


def _in_torch_hub_cache(url: str) -> bool:
    """Whether torch.hub (which timm uses for a pretrained_cfg's url) holds the file of `url` already."""
    from urllib.parse import urlparse

    return (Path(torch.hub.get_dir()) / 'checkpoints' / Path(urlparse(url).path).name).is_file()


def _pretrained(name: str, kwargs: dict[str, Any]) -> tuple[nn.Module | None, str]:
    """(model with pretrained weights, where from) or (None, why not).

    No probe of our own: timm resolves the weights (file, URL or Hugging Face Hub, cache first) and the download
    error, if any, is the answer. huggingface_hub honours HF_HUB_OFFLINE=1 (cache only, no connection attempt);
    without it an unreachable hub costs its connection timeout once (HF_HUB_ETAG_TIMEOUT, 10 s by default).
    """
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None or not (cfg.file or cfg.hf_hub_id or cfg.url):
        return None, f'no pretrained weights are registered for {name}'
    tag = f"{name.split('.')[0]}.{cfg.tag}" if cfg.tag else name
    where = cfg.file or cfg.url or f'hf-hub:{cfg.hf_hub_id}'
    if _offline() and not (cfg.file or cfg.hf_hub_id) and not _in_torch_hub_cache(cfg.url):
        return None, f'{tag}: not in the torch hub cache ({where}) and HF_HUB_OFFLINE is set'  # no download attempt
    try:
        with torch.random.fork_rng(devices=[]):  # a failed attempt leaves the RNG as --no-pretrained would find it
            return _create(name, kwargs, pretrained=True), f'pretrained {tag} ({where})'
    except (ModelArgumentError, TrainError):  # the arguments, not the weights: no fallback helps
        raise
    except (OSError, RuntimeError, ValueError) as e:  # not cached, offline, unreachable, or a bad download
        reason = ' '.join(str(e).split())[:200] or type(e).__name__
        if _offline():
            reason = f'not in the local cache and HF_HUB_OFFLINE is set ({type(e).__name__})'
        return None, f'{tag}: {reason}'


def create_train_model(cfg: TrainConfig, resume: Mapping[str, Any] | None = None
                       ) -> tuple[nn.Module, dict[str, Any], str]:
    """Create the model to train. Returns (model, its architecture kwargs, where its weights come from).

    With `resume` (a checked last.pth) the weights are left for the resume to load; with --initial-checkpoint they
    are loaded (strictly, through checkpoint.load_model); else pretrained weights are tried (see `_pretrained`)
    and random initialisation is the fallback, with a notice.
    """
    name = cfg.model
    if not timm.is_model(name.split('.')[0]):
        pcam = ', '.join(timm.list_models('*pcam*')) or 'none registered'
        raise TrainError(f'--model {name!r}: not a registered timm model (PCam models: {pcam})')
    check_pretrained_tag(name)  # before the pretrained weights are looked up
    aux = {'aux_logits': True} if cfg.aux_weight > 0 else {}  # training-only heads: not in the stored kwargs
    if resume is not None:
        kwargs = architecture_kwargs(cfg, model_kwargs_of(resume))
        return _create(name, {**kwargs, **aux}), kwargs, 'resume'
    if cfg.initial_checkpoint is not None:
        ckpt = read_checkpoint(cfg.initial_checkpoint)
        kwargs = architecture_kwargs(cfg, model_kwargs_of(ckpt))
        try:
            model = load_model(name, ckpt, **kwargs, **aux)
        except CheckpointError as e:
            raise TrainError(f'--initial-checkpoint {cfg.initial_checkpoint}: {e}') from e
        return model, kwargs, f'initial checkpoint {cfg.initial_checkpoint}'
    kwargs = architecture_kwargs(cfg)
    if cfg.pretrained:
        model, where = _pretrained(name, {**kwargs, **aux})
        if model is not None:
            return model, kwargs, where
        _logger.info('notice: pretrained weights for %s are not available (%s); training from random '
                     'initialisation (pass --no-pretrained to silence this)', name, where)
    return _create(name, {**kwargs, **aux}), kwargs, 'random init'


def _create(name: str, kwargs: dict[str, Any], pretrained: bool = False) -> nn.Module:
    try:
        return create_model(name, pretrained=pretrained, **kwargs)
    except ModelArgumentError as e:
        if e.argument == 'aux_logits':
            raise TrainError(f'--aux-weight: {name} has no auxiliary classifiers (googlenet_pcam and '
                             f'inception_v3_pcam have); drop --aux-weight') from None
        raise
