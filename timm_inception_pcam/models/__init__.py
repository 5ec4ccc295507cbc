"""The PCam Inception models; importing this module registers them in timm."""
from .inception_resnet_v2_pcam import InceptionResnetV2Pcam
from .inception_v4_pcam import InceptionV4Pcam

__all__ = ['InceptionResnetV2Pcam', 'InceptionV4Pcam']
