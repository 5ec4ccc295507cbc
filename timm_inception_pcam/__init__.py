"""timm-inception-pcam: Inception-v4 and Inception-ResNet-v2 for PatchCamelyon, as a timm plugin.

Importing the package registers `inception_v4_pcam` and `inception_resnet_v2_pcam` in timm's model registry.
"""
from .constants import LABEL_NAMES, PCAM_INPUT_SIZE, PCAM_MEAN, PCAM_NUM_CLASSES, PCAM_STD
from .models import InceptionResnetV2Pcam, InceptionV4Pcam

__version__ = '0.1.0'
__all__ = [
    'InceptionResnetV2Pcam', 'InceptionV4Pcam', 'LABEL_NAMES', 'PCAM_INPUT_SIZE', 'PCAM_MEAN', 'PCAM_NUM_CLASSES',
    'PCAM_STD', '__version__',
]
