"""timm-inception-pcam: Inception-v4 and Inception-ResNet-v2 for PatchCamelyon, as a timm plugin.

Importing the package registers `inception_v4_pcam` and `inception_resnet_v2_pcam` in timm's model registry, with
`googlenet_pcam`, `inception_v3_pcam`, `inception_resnet_v1_pcam`, `vgg16_pcam` and `vgg16_bn_pcam` beside them.
"""
from .constants import LABEL_NAMES, PCAM_INPUT_SIZE, PCAM_MEAN, PCAM_NUM_CLASSES, PCAM_STD
from .models import (
    GoogLeNetPcam,
    InceptionResnetV1Pcam,
    InceptionResnetV2Pcam,
    InceptionV3Pcam,
    InceptionV4Pcam,
    VggPcam,
    drop_aux_heads,
)

__version__ = '0.1.0'
__all__ = [
    'GoogLeNetPcam', 'InceptionResnetV1Pcam', 'InceptionResnetV2Pcam', 'InceptionV3Pcam', 'InceptionV4Pcam', 'VggPcam',
    'drop_aux_heads', 'LABEL_NAMES', 'PCAM_INPUT_SIZE', 'PCAM_MEAN', 'PCAM_NUM_CLASSES',
    'PCAM_STD', '__version__',
]
