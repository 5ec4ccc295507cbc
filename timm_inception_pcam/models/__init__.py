"""The PCam models; importing this module registers them in timm."""
from ._common import drop_aux_heads
from .googlenet_pcam import GoogLeNetPcam
from .inception_resnet_v1_pcam import InceptionResnetV1Pcam
from .inception_resnet_v2_pcam import InceptionResnetV2Pcam
from .inception_v3_pcam import InceptionV3Pcam
from .inception_v4_pcam import InceptionV4Pcam
from .vgg16_pcam import VggPcam

__all__ = [
    'GoogLeNetPcam', 'InceptionResnetV1Pcam', 'InceptionResnetV2Pcam', 'InceptionV3Pcam', 'InceptionV4Pcam', 'VggPcam',
    'drop_aux_heads',
]
