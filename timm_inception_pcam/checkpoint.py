"""Reading and writing model checkpoints: ours, timm train.py's, safetensors files and Hub models.

Checkpoints are never unpickled beyond tensors and plain containers: `.pth`/`.pth.tar` files load with
`torch.load(weights_only=True)` (timm's train.py stores its argparse Namespace, which is allow-listed alone).
"""
import argparse
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.utils import ParseKwargs

from .errors import CheckpointError, UsageError
from .models._common import WeightsUnavailableError, is_aux_key
from .storage import atomic_path

__all__ = ['CHECKPOINT_FORMAT', 'CheckpointError', 'read_checkpoint', 'load_model', 'save_checkpoint',
           'model_kwargs_of', 'ModelKwargsAction', 'check_pretrained_tag', 'create_model',
           'ModelArgumentError']

# The one format of every checkpoint this project writes (the trainer's last.pth / model_best.pth add 'train_state').
CHECKPOINT_FORMAT = 'timm-inception-pcam-checkpoint/1'


def _to_plain(value: Any) -> Any:
    """argparse.Namespace (timm train.py) and tuples -> dicts and lists, so metadata is plain data."""
    if isinstance(value, argparse.Namespace):
        return {k: _to_plain(v) for k, v in vars(value).items()}
    if isinstance(value, Mapping) and not isinstance(value, torch.Tensor):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


_EXPORTED = {'.onnx': 'ONNX', '.xml': 'OpenVINO', '.plan': 'TensorRT', '.engine': 'TensorRT'}


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file into a dict with at least 'state_dict'.

    Accepts our trainer's files, timm train.py's (`state_dict`, `state_dict_ema`, `arch`, `args`, ...), bare
    state dicts saved with torch.save, and `.safetensors` files (their metadata, if any, becomes top-level keys).
    """
    path = Path(path)
    if not path.is_file():
        hub = ' (a Hub folder: its model.safetensors, or local-dir:' + str(path) + ')' \
            if (path / 'config.json').is_file() else ''
        raise CheckpointError(f'{path}: a folder, expected a checkpoint file{hub}' if path.is_dir()
                              else f'{path}: checkpoint file not found')
    exported = _EXPORTED.get(path.suffix.lower())
    if exported:  # where a command takes exported models, it routes them before this
        raise CheckpointError(f'{path}: an exported {exported} model; this needs the PyTorch checkpoint it was '
                              f'exported from (.pth or .safetensors)')
    if path.suffix == '.safetensors':
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework='pt') as f:
                state_dict = {k: f.get_tensor(k) for k in f.keys()}
                meta = dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f'{path}: not a readable safetensors file ({e})') from e
        if 'model_kwargs' in meta:
            try:
                meta['model_kwargs'] = json.loads(meta['model_kwargs'])
            except ValueError as e:
                raise CheckpointError(f'{path}: its model_kwargs metadata is not JSON ({e}); expected the '
                                      f'create_model arguments as save_checkpoint writes them') from None
            if not isinstance(meta['model_kwargs'], dict):
                raise CheckpointError(f'{path}: its model_kwargs metadata is {type(meta["model_kwargs"]).__name__}, '
                                      f'expected a JSON object')
        if 'arch' not in meta:
            meta.update(_hub_config_of(path))
        return {**meta, 'state_dict': state_dict}
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises a variety of errors for truncated, foreign or unsafe files
        raise CheckpointError(f'{path}: cannot load as a weights-only PyTorch checkpoint: expected a torch.save file '
                              f'of tensors and plain data; it is corrupt, truncated or holds other objects '
                              f'({_load_failure(e)})') from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'{path}: expected a dict of tensors or a checkpoint dict, got {type(obj).__name__}')
    if 'state_dict' not in obj:
        if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f'{path}: no "state_dict" key and not a bare state dict of tensors')
        obj = {'state_dict': obj}
    return {k: v if k in ('state_dict', 'state_dict_ema') else _to_plain(v) for k, v in obj.items()}


def _hub_config_of(weights: Path) -> dict[str, Any]:
    """'arch' and 'model_kwargs' of a weights file in a timm Hub folder, from the config.json beside it ({} if none)."""
    config_path = weights.with_name('config.json')
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding='utf-8'))
    except (OSError, ValueError) as e:
        raise CheckpointError(f'{config_path}: unreadable config.json beside {weights.name} ({e})') from None
    if not isinstance(config, dict) or not isinstance(config.get('architecture'), str):
        return {}
    args = config.get('model_args')
    return {'arch': config['architecture'], 'model_kwargs': dict(args) if isinstance(args, dict) else {}}


def _load_failure(e: Exception) -> str:
    """torch.load's reason in a few words, without its advice to retry with weights_only=False (never ours)."""
    text = str(e)
    found = re.search(r'WeightsUnpickler error:\s*(.+?)(?:\n\n|$)', text, re.S)
    reason = found.group(1) if found else text.split('. ')[0]
    return f'{type(e).__name__}: {" ".join(reason.split())[:200] or "no detail"}'


def model_kwargs_of(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """Architecture arguments stored in a checkpoint (ours: 'model_kwargs'; train.py: args.model_kwargs)."""
    if isinstance(ckpt.get('model_kwargs'), Mapping):
        return dict(ckpt['model_kwargs'])
    args = ckpt.get('args')
    if isinstance(args, Mapping) and isinstance(args.get('model_kwargs'), Mapping):
        return dict(args['model_kwargs'])
    return {}


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrappers' key prefixes (DDP 'module.', torch.compile '_orig_mod.')."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ('module.', '_orig_mod.'):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _num_classes_of(state_dict: Mapping[str, torch.Tensor], classifier: str) -> int | None:
    weight = state_dict.get(f'{classifier}.weight')
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


class ModelKwargsAction(ParseKwargs):
    """timm's `--model-kwargs KEY=VALUE ...` (values read as Python literals, else kept as strings). A word without
    a KEY= and a lower-case true / false / none (kept as a string, so 'false' counted as true) are usage errors."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        for word in values:
            key, eq, value = word.partition('=')
            if word and not (eq and key.isidentifier()):
                parser.error(f'{option_string} {word!r}: expected KEY=VALUE, e.g. depths=1,1,1')
            if value.lower() in ('true', 'false', 'none', 'null') and value not in ('True', 'False', 'None'):
                literal = {'true': 'True', 'false': 'False'}.get(value.lower(), 'None')
                parser.error(f'{option_string} {word!r}: values are Python literals: write {key}={literal}')
        super().__call__(parser, namespace, values, option_string)


class ModelArgumentError(UsageError):
    """A model argument (--model-kwargs or a checkpoint's model_kwargs) that the architecture does not take."""

    def __init__(self, model_name: str, argument: str, value: Any) -> None:
        super().__init__(f'model argument {argument}={value!r}: {model_name} does not take {argument!r} '
                         f'(--model-kwargs or the checkpoint\'s model_kwargs)')
        self.argument = argument


def check_pretrained_tag(model_name: str) -> None:
    """UsageError for `arch.tag` with a tag the registered `arch` does not have (timm raised a RuntimeError)."""
    arch, _, tag = model_name.partition('.')
    if tag and ':' not in model_name and timm.is_model(arch) and model_name not in timm.list_pretrained(f'{arch}.*'):
        tags = ', '.join(name.split('.', 1)[1] for name in timm.list_pretrained(f'{arch}.*')) or 'none'
        raise UsageError(f'{model_name}: {arch} has no pretrained tag {tag!r} (its tags: {tags})')


def create_model(model_name: str, **kwargs: Any) -> nn.Module:
    """`timm.create_model`; an argument the model does not take raises ModelArgumentError (a usage error), pretrained
    weights that cannot be had (not cached, offline, unreachable) WeightsUnavailableError, an unknown pretrained
    tag a UsageError."""
    check_pretrained_tag(model_name)
    try:
        return timm.create_model(model_name, **kwargs)
    except OSError as e:  # huggingface_hub's and urllib's errors: not in the cache, offline, no such repo or file
        if not kwargs.get('pretrained'):
            raise
        reason = ' '.join(str(e).split())[:200] or type(e).__name__
        raise WeightsUnavailableError(f'{model_name}: pretrained weights could not be loaded ({reason}); pass '
                                      f'--checkpoint with a weights file, or load them once with network access '
                                      f'(they are then read from the local cache)') from None
    except TypeError as e:
        found = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if found is None or found.group(1) not in kwargs:
            raise
        raise ModelArgumentError(model_name, found.group(1), kwargs[found.group(1)]) from None


def load_model(
        model_name: str | None,
        checkpoint: str | os.PathLike | Mapping[str, Any] | None = None,
        *,
        pretrained: bool = False,
        use_ema: bool = False,
        **model_kwargs: Any,
) -> nn.Module:
    """Create a registered model and load weights into it; returns the model in eval mode.

    `checkpoint` is a file (ours, timm train.py's, a bare state dict, `.safetensors`), what `read_checkpoint`
    returned for one, or `hf-hub:org/name` / `local-dir:/path` (timm's own resolution; `model_name` may then be
    None). For files, `model_name` None means
    the checkpoint's 'arch'; the class count and architecture arguments stored in the checkpoint are used unless
    given explicitly. Loading is strict: a checkpoint of another architecture or class count is refused.
    """
    import timm_inception_pcam  # noqa: F401  (registers the models when called from a bare script)

    if isinstance(checkpoint, Mapping):  # already read: messages name it by its arch
        ckpt = dict(checkpoint)
        checkpoint = f'checkpoint of {ckpt.get("arch") or "unknown arch"}'
    elif checkpoint is not None and str(checkpoint).startswith(('hf-hub:', 'local-dir:')):
        return create_model(str(checkpoint), pretrained=True, **model_kwargs).eval()
    else:
        ckpt = read_checkpoint(checkpoint) if checkpoint is not None else {}
    arch = ckpt.get('arch')
    if model_name is None:
        if checkpoint is None:
            raise UsageError('no model given: pass --model, --checkpoint, or both')
        if not arch:
            raise CheckpointError(f'{checkpoint}: no model name given and the checkpoint records no "arch"')
        model_name = str(arch)
    if not timm.is_model(model_name):
        raise CheckpointError(f'unknown model {model_name!r}: expected a registered timm model, e.g. '
                              f'{", ".join(timm.list_models("*pcam*"))}')
    if arch and timm.models.split_model_name_tag(str(arch))[0] != timm.models.split_model_name_tag(model_name)[0]:
        raise CheckpointError(f'{checkpoint}: weights of {arch!r} do not fit {model_name} (the checkpoint is for '
                              'another architecture)')

    kwargs = {**model_kwargs_of(ckpt), **model_kwargs}
    if not ckpt:
        return create_model(model_name, pretrained=pretrained, **kwargs).eval()

    key = 'state_dict_ema' if use_ema and ckpt.get('state_dict_ema') else 'state_dict'
    if use_ema and key != 'state_dict_ema':
        raise CheckpointError(f'{checkpoint}: use_ema requested but the checkpoint has no EMA weights')
    state_dict = _strip_prefixes(ckpt[key])
    model = create_model(model_name, pretrained=False, **{'num_classes': 2, **kwargs})
    classifier = model.pretrained_cfg.get('classifier', 'classifier')
    stored_classes = _num_classes_of(state_dict, classifier)
    if stored_classes is not None and stored_classes != model.num_classes:
        if 'num_classes' in model_kwargs:
            raise CheckpointError(f'{checkpoint}: checkpoint has {stored_classes} classes, expected '
                                  f'num_classes={model.num_classes}')
        model = create_model(model_name, pretrained=False, **{**kwargs, 'num_classes': stored_classes})
    own = model.state_dict()
    other_shape = [k for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    mismatched = [k for k in other_shape if not is_aux_key(k)]
    if mismatched:
        k = mismatched[0]
        raise CheckpointError(
            f'{checkpoint}: weights do not match {model_name} {kwargs or ""}: {len(mismatched)} tensors of other '
            f'shapes (e.g. {k}: {tuple(state_dict[k].shape)} in the checkpoint, {tuple(own[k].shape)} in the model)')
    state_dict = {k: v for k, v in state_dict.items() if k not in other_shape}  # aux heads of another size: fresh
    result = model.load_state_dict(state_dict, strict=False)
    # Auxiliary classifiers (GoogLeNet, Inception-v3 trained with --aux-weight) are training-only: a checkpoint's
    # aux heads are dropped for a model built without them, and a model built with them may start them fresh.
    missing = [k for k in result.missing_keys if not is_aux_key(k)]
    unexpected = [k for k in result.unexpected_keys if not is_aux_key(k)]
    if missing or unexpected:
        raise CheckpointError(
            f'{checkpoint}: weights do not match {model_name} {kwargs or ""}: '
            f'{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})')
    return model.eval()


def save_checkpoint(
        path: str | os.PathLike,
        model: nn.Module,
        *,
        arch: str,
        model_kwargs: Mapping[str, Any] | None = None,
        aux_heads: bool = True,
        **extra: Any,
) -> Path:
    """Write a weights-only-loadable checkpoint atomically ('.safetensors' suffix: weights + metadata only).

    `aux_heads=False` leaves auxiliary classifiers out: the file loads strictly into the model without them (timm's
    scripts). `extra` may hold tensors, numbers, strings and (nested) lists/dicts of them: e.g. optimizer state,
    epoch, metrics, 'state_dict_ema'.
    """
    state_dict = {k: v.detach().cpu().contiguous() for k, v in _strip_prefixes(model.state_dict()).items()
                  if aux_heads or not is_aux_key(k)}
    for k, v in state_dict.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f'{path}: refusing to save non-finite values in {k}')
    path = Path(path)
    if path.suffix == '.safetensors':
        from safetensors.torch import save_file
        meta = {'arch': arch, 'format': CHECKPOINT_FORMAT, 'model_kwargs': json.dumps(dict(model_kwargs or {}))}
        meta.update({k: str(v) for k, v in extra.items() if isinstance(v, (str, int, float))})
        with atomic_path(path) as tmp:
            save_file(state_dict, str(tmp), metadata=meta)
        return path
    payload = {
        'format': CHECKPOINT_FORMAT,
        'arch': arch,
        'model_kwargs': dict(model_kwargs or {}),
        'num_classes': int(getattr(model, 'num_classes', 0)),
        'pretrained_cfg': _to_plain(dict(getattr(model, 'pretrained_cfg', {}) or {})),
        'state_dict': state_dict,
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path
