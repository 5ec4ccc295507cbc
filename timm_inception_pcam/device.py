"""What this machine's CPU can do, for choosing precision on the CPU paths (training, inference).

bf16 pays off on a CPU that computes it in hardware: AMX tiles (Intel Sapphire Rapids and newer) or AVX-512 BF16
dot products (AMD Zen 4 and newer, Intel Cooper Lake). On the 2-core AMD EPYC (AVX-512 BF16, no AMX) machines of
this project, 2026-12-04, inception_v4_pcam at batch 64: torch bf16 2.6x eager float32 and OpenVINO bf16 3.1x
(channels_last 1.3x); a bf16 training step 1.4x float32's. Elsewhere bf16 is emulated and slower than float32.
"""
import platform
from pathlib import Path

import torch

__all__ = ['cpu_model_name', 'cpu_has_amx', 'cpu_has_avx512_bf16', 'cpu_has_native_bf16']


def _cpu_feature(probe_name: str, cpuinfo_flag: str) -> bool:
    """torch's probe `torch.cpu.<probe_name>` where it exists, else the flag in /proc/cpuinfo."""
    probe = getattr(torch.cpu, probe_name, None)
    if probe is not None:
        try:
            return bool(probe())
        except RuntimeError:
            pass
    return cpuinfo_flag in _cpuinfo_flags()


def cpu_model_name() -> str:
    """The CPU's model name (/proc/cpuinfo; else what the platform module says)."""
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpuinfo_flags() -> set[str]:
    try:
        return set(Path('/proc/cpuinfo').read_text().split())
    except OSError:
        return set()


def cpu_has_amx() -> bool:
    """True when this CPU has AMX tiles (bf16 matrix units)."""
    return _cpu_feature('_is_amx_tile_supported', 'amx_bf16')


def cpu_has_avx512_bf16() -> bool:
    """True when this CPU has AVX-512 BF16 (bf16 dot-product instructions)."""
    return _cpu_feature('_is_avx512_bf16_supported', 'avx512_bf16')


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AMX or AVX-512 BF16), where bf16 pays off (module docstring)."""
    return cpu_has_amx() or cpu_has_avx512_bf16()
