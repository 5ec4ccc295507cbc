"""Shared fixtures. Tests never reach a hub: the environment is pinned offline for the whole session."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TIMM_INCEPTION_PCAM_NO_AUTOLOAD', '0')

import pytest  # noqa: E402
import torch  # noqa: E402

import timm_inception_pcam  # noqa: E402,F401  (registers the models)

MODEL_NAMES = ('inception_v4_pcam', 'inception_resnet_v2_pcam')
TINY_DEPTHS = (1, 1, 1)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope='session', autouse=True)
def _openvino_cache(tmp_path_factory: pytest.TempPathFactory):
    """The tests' OpenVINO conversions go to a temporary cache, not the user's (their random weights never recur)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('TIMM_INCEPTION_PCAM_OPENVINO_CACHE', str(tmp_path_factory.mktemp('openvino-cache')))
        yield


@pytest.fixture(scope='session')
def model_names() -> tuple[str, ...]:
    return MODEL_NAMES
