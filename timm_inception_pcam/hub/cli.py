"""Publish a trained checkpoint to the Hugging Face Hub as a timm model repository, and check it loads back.

    python -m timm_inception_pcam.publish --checkpoint model_best.pth --report report.json \\
        --repo-id ORG/NAME [--model NAME] [--onnx model.onnx] [--plots-dir DIR] [--dry-run] --output DIR

Writes DIR/NAME atomically: `model.safetensors` (no pickle), `config.json` in timm's format (architecture, num_classes,
model_args, pretrained_cfg with the 96-px PCam data configuration, label names, plus the provenance of the files),
a model card `README.md` whose front matter carries the evaluation report's metrics, the report's ROC / PR plots
and, optionally, the ONNX model. Before writing, the folder is loaded back with `timm.create_model('local-dir:...')`
and must give the same weights and data configuration. Without `--dry-run` it is uploaded with huggingface_hub,
unless the Hub already holds the identical `config.json` (same checkpoint, report and files): no duplicate commit.
A report on synthetic data (or one that does not record its data) is uploaded only with `--allow-synthetic`.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm

from ..errors import ArgumentParser
from ..models._common import PCAM_HUB_ORG  # (importing the models registers them and their .pcam tags)
from .card import DEFAULT_DATASET_ID
from .folder import FolderConfig, build_hub_folder
from .report import PublishError, check_repo_id
from .upload import check_upload_allowed, not_pcam_reasons, upload_command, upload_folder

__all__ = ['OFFICIAL_REPOS', 'build_parser', 'main']

# Where the project's own PCam-trained weights go: the repos the models' `<model>.pcam` tags name (all seven models).
OFFICIAL_REPOS: dict[str, str] = {name.split('.')[0]: timm.models.get_pretrained_cfg(name).hf_hub_id
                                  for name in timm.list_pretrained('*.pcam')}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog='python -m timm_inception_pcam.publish', description=__doc__.split('\n\n')[0])
    p.add_argument('--checkpoint', required=True, type=Path, help='trained checkpoint file to publish')
    p.add_argument('--report', required=True, type=Path,
                   help='report.json from `python -m timm_inception_pcam.evaluate` for this checkpoint: weights are '
                        'not published without measured metrics')
    p.add_argument('--repo-id', required=True, help='Hub repository, ORG/NAME')
    p.add_argument('--model', default=None, help='model name (default: the checkpoint\'s "arch")')
    p.add_argument('--use-ema', action='store_true', help='publish the checkpoint\'s EMA weights')
    p.add_argument('--onnx', type=Path, default=None, help='also publish this exported ONNX model (as model.onnx)')
    p.add_argument('--plots-dir', type=Path, default=None, help='where the report\'s plots are (default: beside it)')
    p.add_argument('--mean', type=float, nargs=3, default=None, metavar=('R', 'G', 'B'),
                   help='normalisation mean for reports that do not record theirs (default: the report\'s, else '
                        'the checkpoint\'s, else PCam\'s)')
    p.add_argument('--std', type=float, nargs=3, default=None, metavar=('R', 'G', 'B'), help='as --mean')
    p.add_argument('--dataset-id', default=DEFAULT_DATASET_ID,
                   help=f'Hub dataset id of PCam named in the model card of a PCam result (default: '
                        f'{DEFAULT_DATASET_ID})')
    p.add_argument('--license', default='apache-2.0', help='license of the published weights (default: apache-2.0)')
    p.add_argument('--base-model', default=None, help='Hub id of the initial weights, e.g. timm/inception_v4.tf_in1k')
    p.add_argument('--private', action='store_true', help='create the repository private')
    p.add_argument('--revision', default=None, help='branch to upload to (default: main)')
    p.add_argument('--commit-message', default=None, help='default: names the model, checkpoint and ROC AUC')
    p.add_argument('--allow-synthetic', action='store_true',
                   help='upload even when the report is on synthetic data or does not record its data (the card '
                        'says so at every number and carries no PCam model-index)')
    p.add_argument('--dry-run', action='store_true', help='write and verify the folder, upload nothing')
    p.add_argument('--output', required=True, type=Path, help='folder under which ORG/NAME\'s NAME folder is written')
    return p


def main(argv: Sequence[str] | None = None, *, api: Any = None) -> dict[str, Any]:
    """Build the Hub folder; upload it unless --dry-run. `api` replaces huggingface_hub.HfApi (tests)."""
    args = build_parser().parse_args(argv)
    check_repo_id(args.repo_id)
    cfg = FolderConfig(checkpoint=args.checkpoint, report=args.report, repo_id=args.repo_id, output=args.output,
                       model=args.model, use_ema=args.use_ema, onnx=args.onnx, plots_dir=args.plots_dir,
                       mean=args.mean, std=args.std, dataset_id=args.dataset_id, license_id=args.license,
                       base_model=args.base_model)
    result = build_hub_folder(cfg)
    synthetic_note = '' if result['data_provenance'] == 'pcam' else f' on {result["data_provenance"]} data'
    message = args.commit_message or (
        f'Publish {result["model"]} (checkpoint sha256 {result["checkpoint_sha256"][:12]}, '
        f'{result["split"]} ROC AUC {result["metrics"]["roc_auc"]:.4f}{synthetic_note})')
    result['repo_id'] = args.repo_id
    result['upload_command'] = upload_command(result['folder'], args.repo_id, message, args.private)
    result['uploaded'] = False
    own_repo = OFFICIAL_REPOS.get(result['model'], '')
    official = args.repo_id.split('/')[0].lower() == PCAM_HUB_ORG.lower()  # the Hub's names ignore case
    if official and args.repo_id.lower() != own_repo.lower():
        raise PublishError(f'{args.repo_id}: the {PCAM_HUB_ORG} organisation holds the official repo of each '
                           f'model\'s .pcam tag; {result["model"]} weights go to {own_repo or "none of them"} or to '
                           f'a repo of yours')
    if official and (result['data_provenance'] != 'pcam' or result['training_data_provenance'] == 'synthetic'):
        raise PublishError(f'{args.repo_id} is the official repo of the {result["model"]}.pcam tag: it only takes '
                           f'weights evaluated on PCam and not trained on synthetic data (report: '
                           f'{result["data_provenance"]}, checkpoint: {result["training_data_provenance"]}); publish '
                           f'to another --repo-id')
    if args.dry_run:
        print('[5/5] dry run: nothing uploaded')
        refusal = not_pcam_reasons(result['data_provenance'], result['training_data_provenance'])
        if refusal and not args.allow_synthetic:  # `hf upload` would skip the refusal: not offered
            result['upload_command'] = None
            print(f'upload: refused as it is ({refusal}); the same command without --dry-run and with '
                  f'--allow-synthetic uploads it labelled as such')
        else:
            print(f'upload with: {result["upload_command"]}')
        summary = f'dry run: {result["folder"]} ready ({len(result["files"])} files) for {args.repo_id}'
    else:
        check_upload_allowed(result['data_provenance'], result['training_data_provenance'],
                             allow_synthetic=args.allow_synthetic, folder=result['folder'])
        print(f'[5/5] uploading to {args.repo_id}')
        result.update(upload_folder(result['folder'], args.repo_id, commit_message=message, private=args.private,
                                    revision=args.revision, api=api))
        if result['uploaded']:
            summary = f'published {result["folder"]} to {result["url"]} ({result["reason"]})'
        else:
            summary = f'{args.repo_id} unchanged: {result["reason"]}; no commit made'
    if official:
        print(f'note: {args.repo_id} is the official repo of {result["model"]}.pcam: once it holds the weights, '
              f'timm.create_model("{result["model"]}.pcam", pretrained=True) loads them (no code change)')
    if result['data_provenance'] != 'pcam':
        summary += f' (results on {result["data_provenance"]} data, labelled as such in the card)'
    print(summary)
    return result
