"""Augmentations that respect PCam's label: it depends on the centre 32x32 region and on no orientation.

Training: one of the 8 dihedral transforms (rotations by 90 degrees and flips), H&E stain jitter in HED colour
space (Ruifrok & Johnston's stain vectors), mild brightness / contrast / saturation jitter and a small shift
(at most 8 px, reflected at the border, so the centre region never leaves the patch). Never a crop or resize.
"""
from collections.abc import Sequence

import numpy as np
import torch

from ..constants import PCAM_MEAN, PCAM_STD
from ..preprocess import preprocess_patches

__all__ = ['dihedral', 'create_pcam_transform', 'PcamTransform', 'stain_jitter']

# Optical-density stain vectors (rows: haematoxylin, eosin, DAB) of Ruifrok & Johnston 2001, as used by skimage.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 symmetries of the square on the last two dims: rotation by 90*(k % 4), then a flip if k>=4."""
    if not 0 <= k < 8:
        raise ValueError(f'dihedral transform index must be in 0..7, got {k}')
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def stain_jitter(image: np.ndarray, rng: np.random.Generator, sigma: float = 0.05, bias: float = 0.05) -> np.ndarray:
    """Perturb haematoxylin / eosin / DAB concentrations: od' = od * (1 + a) + b per stain; float32 HWC in [0, 1]."""
    od = -np.log(np.clip(image, 1e-6, 1.0))
    hed = od.reshape(-1, 3) @ _HED_FROM_RGB
    alpha = rng.uniform(1 - sigma, 1 + sigma, size=3).astype(np.float32)
    beta = rng.uniform(-bias, bias, size=3).astype(np.float32)
    od = ((hed * alpha + beta) @ _RGB_FROM_HED).reshape(image.shape)
    return np.clip(np.exp(-od), 0.0, 1.0).astype(np.float32)


class PcamTransform:
    """uint8 HWC patch -> normalised float32 CHW tensor, with PCam-safe augmentation when training."""

    def __init__(
            self,
            is_training: bool,
            mean: Sequence[float] = PCAM_MEAN,
            std: Sequence[float] = PCAM_STD,
            dihedral_aug: bool = True,
            stain_sigma: float = 0.05,
            stain_bias: float = 0.05,
            brightness: float = 0.1,
            contrast: float = 0.1,
            saturation: float = 0.1,
            max_shift: int = 4,
    ) -> None:
        if max_shift > 8:
            raise ValueError(f'max_shift={max_shift}: more than 8 px would move the label region (centre 32x32)')
        self.is_training = is_training
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.dihedral_aug = dihedral_aug
        self.stain_sigma, self.stain_bias = stain_sigma, stain_bias
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation
        self.max_shift = max_shift

    def _augment(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.stain_sigma or self.stain_bias:
            x = stain_jitter(x, rng, self.stain_sigma, self.stain_bias)
        if self.brightness:
            x = x * rng.uniform(1 - self.brightness, 1 + self.brightness)
        if self.contrast:
            m = x.mean()
            x = (x - m) * rng.uniform(1 - self.contrast, 1 + self.contrast) + m
        if self.saturation:
            grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            x = (x - grey[..., None]) * rng.uniform(1 - self.saturation, 1 + self.saturation) + grey[..., None]
        if self.max_shift:
            dy, dx = rng.integers(-self.max_shift, self.max_shift + 1, size=2)
            s = self.max_shift
            padded = np.pad(x, ((s, s), (s, s), (0, 0)), mode='reflect')
            x = padded[s + dy:s + dy + x.shape[0], s + dx:s + dx + x.shape[1]]
        return np.clip(x, 0.0, 1.0)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if not self.is_training:  # the preprocessing of every inference path, on a batch of one
            return torch.from_numpy(preprocess_patches(np.asarray(image), self.mean, self.std)[0])
        # randomness drawn from torch's generator, which DataLoader seeds per worker and checkpoints can restore
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
        x = self._augment(image.astype(np.float32) / 255.0, rng)
        x = (x - self.mean) / self.std
        t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
        if self.dihedral_aug:
            t = dihedral(t, int(rng.integers(8)))
        return t.contiguous()


def create_pcam_transform(
        is_training: bool,
        mean: Sequence[float] = PCAM_MEAN,
        std: Sequence[float] = PCAM_STD,
        **aug,
) -> PcamTransform:
    """The PCam transform: see `PcamTransform` for the augmentation arguments (used only when training)."""
    return PcamTransform(is_training, mean, std, **aug)
