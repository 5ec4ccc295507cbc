"""Publishing to the Hugging Face Hub, by concern: report and input checks (report), the folder (folder), the model
card (card, rendered from the `model_card.md` template), upload (upload) and the command (cli)."""
from .card import DEFAULT_DATASET_ID
from .cli import OFFICIAL_REPOS, main
from .folder import PROVENANCE_KEY, FolderConfig, build_hub_folder
from .report import (
    PublishError,
    check_finite,
    check_repo_id,
    check_report_checkpoint,
    path_inside,
    provenance_of,
    read_report,
)
from .upload import check_upload_allowed, upload_command, upload_folder

__all__ = ['DEFAULT_DATASET_ID', 'OFFICIAL_REPOS', 'PROVENANCE_KEY', 'FolderConfig', 'PublishError',
           'build_hub_folder', 'check_finite', 'check_repo_id', 'check_report_checkpoint', 'check_upload_allowed',
           'main', 'path_inside', 'provenance_of', 'read_report', 'upload_command', 'upload_folder']
