"""What this machine's CPU can do, for choosing precision on the CPU paths (training, inference)."""
from pathlib import Path

import torch

__all__ = ['cpu_has_amx']


def cpu_has_amx() -> bool:
    """True when this CPU has AMX tiles (bf16 matrix units), where bf16 autocast pays off."""
    probe = getattr(torch.cpu, '_is_amx_tile_supported', None)
    if probe is not None:
        try:
            return bool(probe())
        except RuntimeError:
            pass
    try:
        return 'amx_bf16' in Path('/proc/cpuinfo').read_text()
    except OSError:
        return False
