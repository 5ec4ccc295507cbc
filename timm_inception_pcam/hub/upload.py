"""Uploading a Hub folder: refused for results that are not PCam's unless asked, no duplicate commit, no stale
weights left beside new ones, and the token never shown."""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from .folder import PROVENANCE_KEY
from .report import PublishError

__all__ = ['STALE_WEIGHT_PATTERNS', 'check_upload_allowed', 'not_pcam_reasons', 'upload_command', 'upload_folder']

# Remote weight files an upload removes unless the new folder has them: no stale pickle or ONNX beside new weights.
STALE_WEIGHT_PATTERNS = ('*.onnx', '*.onnx.data', '*.data', '*.bin', '*.pth', '*.pt', '*.ckpt', '*.safetensors')


def not_pcam_reasons(data_provenance: str, training_provenance: str) -> str | None:
    """Why a model's numbers are not PCam results (synthetic or unrecorded data), or None when they are."""
    reasons = []
    if data_provenance != 'pcam':
        reasons.append(f'the evaluation report records {data_provenance} data'
                       + (' (no data.provenance)' if data_provenance == 'unknown' else ''))
    if training_provenance == 'synthetic':
        reasons.append('the checkpoint was trained on synthetic data')
    return ' and '.join(reasons) or None


def check_upload_allowed(data_provenance: str, training_provenance: str, *, allow_synthetic: bool,
                         folder: str | os.PathLike) -> None:
    """Refuse to upload a model whose results are not PCam's (synthetic or unrecorded data) unless allowed."""
    reasons = not_pcam_reasons(data_provenance, training_provenance)
    if reasons and not allow_synthetic:
        raise PublishError(f'not uploading {folder}: {reasons}, so its numbers are not PCam results; '
                           f'evaluate on PCam (python -m timm_inception_pcam.data download) and publish that report, '
                           f'or pass --allow-synthetic to upload it labelled as such')


def upload_command(folder: str | os.PathLike, repo_id: str, commit_message: str, private: bool = False) -> str:
    """The `hf upload` command line equivalent to the upload this tool performs."""
    cmd = ['hf', 'upload', repo_id, str(folder), '.', '--repo-type', 'model', '--commit-message', commit_message]
    if private:
        cmd.append('--private')
    return shlex.join(cmd)


def _remote_config(api: Any, repo_id: str, revision: str | None) -> dict[str, Any] | None:
    if not api.file_exists(repo_id, 'config.json', revision=revision):
        return None
    path = api.hf_hub_download(repo_id=repo_id, filename='config.json', revision=revision)
    try:
        return json.loads(Path(path).read_text(encoding='utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def upload_folder(folder: str | os.PathLike, repo_id: str, *, commit_message: str, private: bool = False,
                  revision: str | None = None, api: Any = None) -> dict[str, Any]:
    """Create the repo if needed and upload `folder`, unless the Hub already holds the identical config.json.

    Remote weight files that the folder does not have (an earlier ONNX model, a pickle) are deleted in the same commit.
    The token comes from HF_TOKEN or the cached login (`hf auth login`); it is never printed or written.
    """
    folder = Path(folder)
    local = json.loads((folder / 'config.json').read_text(encoding='utf-8'))
    if api is None:
        from huggingface_hub import HfApi, get_token

        if not get_token():
            command = upload_command(folder, repo_id, commit_message, private)
            raise PublishError(f'no Hugging Face token: set HF_TOKEN or run `hf auth login`; the folder {folder} is '
                               f'ready, upload it later with: {command}')
        api = HfApi(library_name='timm-inception-pcam')
    try:
        repo_url = api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
        repo_id = getattr(repo_url, 'repo_id', None) or repo_id
        remote = _remote_config(api, repo_id, revision)
        url = f'https://huggingface.co/{repo_id}'
        if remote == local:
            return {'uploaded': False, 'url': url, 'commit_url': None,
                    'reason': 'the Hub already holds this exact folder (same checkpoint, report and files)'}
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type='model', revision=revision,
                                 commit_message=commit_message, delete_patterns=list(STALE_WEIGHT_PATTERNS))
    except Exception as e:  # network / permission / offline errors of huggingface_hub, reported without a traceback
        detail = (str(e).splitlines() or [''])[0][:300]
        command = upload_command(folder, repo_id, commit_message, private)
        raise PublishError(f'upload to {repo_id} failed ({type(e).__name__}: {detail}); the folder {folder} is '
                           f'ready, retry or run: {command}') from e
    return {'uploaded': True, 'url': url, 'commit_url': getattr(info, 'commit_url', None),
            'reason': 'updated' if remote and remote.get(PROVENANCE_KEY, {}).get('checkpoint_sha256') ==
            local[PROVENANCE_KEY]['checkpoint_sha256'] else 'new checkpoint'}
