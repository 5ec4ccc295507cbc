"""The model card: front matter (ModelCardData, model-index) and the body rendered from `model_card.md` (Jinja).

A result is presented as a PatchCamelyon result only when the report records PCam data: synthetic results say so at
every number and carry no model-index entry (no dataset id a leaderboard could read as PCam), nor do results of
unrecorded provenance.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..constants import LABEL_NAMES
from .report import CARD_METRICS, ONNX_NAME, TABLE_METRICS, WEIGHTS_NAME, finite_number

__all__ = ['TEMPLATE', 'DEFAULT_DATASET_ID', 'PAPERS', 'card_data', 'render_card', 'training_description']

TEMPLATE = Path(__file__).with_name('model_card.md')
# PatchCamelyon on the Hub: the complete official splits under PCam's own names (train / valid / test, 262,144 /
# 32,768 / 32,768 patches), CC0 like the original, with the paper's citation (README section:publish says more).
DEFAULT_DATASET_ID = '1aurent/PatchCamelyon'
PAPERS = {'inception_v4_pcam': 'Inception-v4', 'inception_resnet_v2_pcam': 'Inception-ResNet-v2',
          'inception_resnet_v1_pcam': 'Inception-ResNet-v1', 'inception_v3_pcam': 'Inception-v3',
          'googlenet_pcam': 'GoogLeNet (Inception-v1)', 'vgg16_pcam': 'VGG16', 'vgg16_bn_pcam': 'VGG16 with BatchNorm'}
_INCEPTION_V4 = """@inproceedings{szegedy2017inception,
  title={Inception-v4, Inception-ResNet and the Impact of Residual Connections on Learning},
  author={Szegedy, Christian and Ioffe, Sergey and Vanhoucke, Vincent and Alemi, Alexander A.},
  booktitle={AAAI Conference on Artificial Intelligence}, year={2017}
}"""
_VGG = """@inproceedings{simonyan2015very,
  title={Very Deep Convolutional Networks for Large-Scale Image Recognition},
  author={Simonyan, Karen and Zisserman, Andrew},
  booktitle={International Conference on Learning Representations (ICLR)}, year={2015}
}"""
CITATIONS = {  # the paper of each architecture, cited in its card beside PCam's
    'inception_v4_pcam': _INCEPTION_V4, 'inception_resnet_v2_pcam': _INCEPTION_V4,
    'inception_resnet_v1_pcam': _INCEPTION_V4,
    'inception_v3_pcam': """@inproceedings{szegedy2016rethinking,
  title={Rethinking the Inception Architecture for Computer Vision},
  author={Szegedy, Christian and Vanhoucke, Vincent and Ioffe, Sergey and Shlens, Jon and Wojna, Zbigniew},
  booktitle={IEEE Conference on Computer Vision and Pattern Recognition (CVPR)}, year={2016}
}""",
    'googlenet_pcam': """@inproceedings{szegedy2015going,
  title={Going Deeper with Convolutions},
  author={Szegedy, Christian and Liu, Wei and Jia, Yangqing and Sermanet, Pierre and Reed, Scott and Anguelov,
    Dragomir and Erhan, Dumitru and Vanhoucke, Vincent and Rabinovich, Andrew},
  booktitle={IEEE Conference on Computer Vision and Pattern Recognition (CVPR)}, year={2015}
}""",
    'vgg16_pcam': _VGG, 'vgg16_bn_pcam': _VGG,
}
_PLOT_NAMES = {'roc': 'ROC curve', 'pr': 'precision-recall curve', 'confusion': 'confusion matrix'}
_PCAM_TAGS = ['patchcamelyon', 'pcam']
_BASE_TAGS = ['timm', 'image-classification', 'pathology', 'histopathology', 'timm-inception-pcam']
_DATA_NOTES = {
    'synthetic': 'The evaluation report records synthetic data (`data.provenance: synthetic`).',
    'unknown': 'The evaluation report does not record whether its patches are PatchCamelyon or synthetic.',
}
_TRAINING = {
    'pcam': 'trained on PatchCamelyon (PCam)',
    'synthetic': 'trained on synthetic PCam-format patches (generated, not PatchCamelyon)',
    'unknown': 'trained on data whose provenance the checkpoint does not record',
}


def _fmt(value: float) -> str:
    return f'{value:.4f}'


def training_description(arch: str, training: str) -> str:
    """One line for pretrained_cfg['description']: the architecture and what it was trained on."""
    return f'{PAPERS.get(arch, arch)} {_TRAINING[training]} (normal / metastatic)'


def card_data(*, name: str, report: Mapping[str, Any], provenance: str, training: str, dataset_id: str,
              license_id: str, base_model: str | None) -> Any:
    """The front matter: a PCam model-index only for a report on PCam data."""
    from huggingface_hub import EvalResult, ModelCardData

    synthetic = 'synthetic' in (provenance, training)
    results = None
    if provenance == 'pcam' and not synthetic:
        split = report['split']
        results = [
            EvalResult(task_type='image-classification', task_name='Image Classification', dataset_type=dataset_id,
                       dataset_name='PatchCamelyon (PCam)', dataset_split=split, metric_type=metric_type,
                       metric_value=round(float(report['metrics'][key]), 6), metric_name=f'{display} ({split})')
            for key, metric_type, display in CARD_METRICS
        ]
    tags = _BASE_TAGS + (_PCAM_TAGS if results else []) + (['synthetic-data'] if synthetic else [])
    return ModelCardData(
        library_name='timm', pipeline_tag='image-classification', license=license_id,
        datasets=[dataset_id] if results else None, tags=tags, base_model=base_model,
        metrics=[m[1] for m in CARD_METRICS], model_name=name, eval_results=results,
    )


def render_card(*, repo_id: str, arch: str, report: Mapping[str, Any], provenance: str, training: str,
                meta: Mapping[str, Any], train_args: Mapping[str, Any], model_args: Mapping[str, Any],
                data_cfg: Mapping[str, Any], plots: Mapping[str, str], onnx_info: Mapping[str, Any] | None,
                num_params: int, hashes: Mapping[str, Any], dataset_id: str, license_id: str,
                base_model: str | None) -> str:
    """The model card's text (README.md of the Hub folder)."""
    from huggingface_hub import ModelCard

    name = repo_id.split('/')[-1]
    split, metrics, ci95 = report['split'], report['metrics'], report.get('ci95') or {}
    synthetic = 'synthetic' in (provenance, training)
    data = card_data(name=name, report=report, provenance=provenance, training=training, dataset_id=dataset_id,
                     license_id=license_id, base_model=base_model)
    tta = f' with {report["tta"]}-fold dihedral test-time augmentation' if (report.get('tta') or 1) > 1 else ''
    if provenance == 'pcam' and not synthetic:
        heading = f'Results on the PCam {split} split'
        caption = f'Measured on {report["n"]} patches of the `{split}` split{tta}.'
    elif synthetic:
        heading = f'Results on synthetic data (not PCam): the `{split}` split of generated patches'
        caption = (f'**Synthetic data:** measured on {report["n"]} generated PCam-format patches of the `{split}` '
                   f'split{tta}, not on PatchCamelyon.')
    else:
        heading = f'Results on data of unrecorded provenance (`{split}` split)'
        caption = (f'Measured on {report["n"]} patches of a `{split}` split{tta} that the report does not identify '
                   f'as PatchCamelyon or synthetic: not a PCam result.')
    rows = []
    for key, display in TABLE_METRICS:
        if finite_number(metrics.get(key)):
            ci = ci95.get(key)
            ci_text = f'{_fmt(ci[0])} to {_fmt(ci[1])}' if isinstance(ci, (list, tuple)) and len(ci) == 2 else ''
            rows.append({'display': display, 'value': _fmt(metrics[key]), 'ci': ci_text})
    threshold = report.get('threshold') or {}
    threshold_line = ''
    if finite_number(threshold.get('value')):
        source = 'chosen on the valid split' if threshold.get('source') == 'valid' else 'the default'
        if threshold.get('fallback'):
            source += f', as {threshold["fallback"]}'
        threshold_line = f'Decisions use P({LABEL_NAMES[1]}) >= {threshold["value"]:.4f} ({source}).'
    confusion_line = ''
    if all(finite_number(metrics.get(k)) for k in ('tp', 'fp', 'tn', 'fn')):
        confusion_line = (f'Confusion counts: TP {metrics["tp"]}, FP {metrics["fp"]}, TN {metrics["tn"]}, '
                          f'FN {metrics["fn"]}.')
    baked = bool(onnx_info) and onnx_info['input_dtype'] == 'uint8'  # preprocessing inside the graph
    if onnx_info:
        input_name, output_name = onnx_info['inputs'][0][0], onnx_info['outputs'][0][0]
        layout = ('uint8 NHWC patches, normalisation inside the graph' if baked else
                  f'{onnx_info["input_dtype"]} NCHW, normalised as above')
    else:
        input_name, output_name, layout = 'input', 'logits', ''
    meta_lines = [(label, f'{meta[key]:.4f}' if key == 'best_metric' and finite_number(meta[key]) else meta[key])
                  for key, label in (
        ('epoch', 'Checkpoint epoch (counted from 0)'), ('weights', 'Weights'), ('selection', 'Selected by'),
        ('best_metric', f'Selection value (validation split{", synthetic data" if synthetic else ""})'))
        if meta.get(key) is not None]
    card = ModelCard.from_template(
        data, template_path=str(TEMPLATE),
        name=name, repo_id=repo_id, arch=arch, paper=PAPERS.get(arch, arch), citation=CITATIONS.get(arch, ''),
        num_params=num_params,
        size=list(data_cfg['input_size']), labels=list(LABEL_NAMES), provenance=provenance, training=training,
        synthetic=synthetic, data_note=_DATA_NOTES.get('synthetic' if synthetic else provenance, ''),
        training_text=_TRAINING[training], training_data_line=_TRAINING[training].replace('trained on ', '', 1),
        results_heading=heading, results_caption=caption, rows=rows, threshold_line=threshold_line,
        confusion_line=confusion_line, plots=[(_PLOT_NAMES.get(k, k), f) for k, f in plots.items()],
        plot_note=' (synthetic data)' if synthetic else '', onnx=onnx_info, onnx_name=ONNX_NAME,
        onnx_layout=layout, input_name=input_name, output_name=output_name, baked=baked,
        trt_shape='96x96x3' if baked else '3x96x96',
        mean=', '.join(f'{v:.4f}' for v in data_cfg['mean']), std=', '.join(f'{v:.4f}' for v in data_cfg['std']),
        model_args_json=json.dumps(dict(model_args), sort_keys=True), meta_lines=meta_lines, base_model=base_model,
        train_args=[(k, json.dumps(v)) for k, v in sorted(train_args.items())], hashes=hashes,
        weights_name=WEIGHTS_NAME,
    )
    return str(card)
