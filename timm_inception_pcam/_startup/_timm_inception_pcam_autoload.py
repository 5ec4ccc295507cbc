"""Start-up hook installed beside timm-inception-pcam: registers the PCam models whenever `timm` is imported.

Loaded by `timm_inception_pcam_autoload.pth` at interpreter start-up. It imports nothing heavy (no torch): it only
adds a finder that, once `timm` has finished importing, imports `timm_inception_pcam`, so unmodified timm scripts
(train.py, validate.py, inference.py, benchmark.py) see `inception_v4_pcam` and `inception_resnet_v2_pcam`.
Set TIMM_INCEPTION_PCAM_AUTOLOAD=0 to turn it off.
"""
import importlib
import importlib.abc
import os
import sys
import warnings

ENV_VAR = 'TIMM_INCEPTION_PCAM_AUTOLOAD'
PLUGIN = 'timm_inception_pcam'


def _load_plugin() -> None:
    try:
        importlib.import_module(PLUGIN)
    except Exception as e:  # never break `import timm` because of the plugin
        warnings.warn(f'{PLUGIN}: automatic registration after `import timm` failed ({type(e).__name__}: {e}); '
                      f'import {PLUGIN} explicitly or set {ENV_VAR}=0', RuntimeWarning, stacklevel=2)


class TimmImportHook(importlib.abc.MetaPathFinder):
    """Finds `timm` with the other finders and wraps its loader to import the plugin right after it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'timm':
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, 'find_spec'):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, 'exec_module'):
            return spec
        exec_timm = loader.exec_module

        def exec_module(module) -> None:
            exec_timm(module)
            uninstall()
            _load_plugin()

        loader.exec_module = exec_module
        return spec


def enabled() -> bool:
    return os.environ.get(ENV_VAR, '1').strip().lower() not in ('0', 'false', 'no', 'off')


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, TimmImportHook)]


def install() -> None:
    """Register the plugin after `timm` is imported (at once if it already is); idempotent."""
    if not enabled():
        return
    if 'timm' in sys.modules:
        _load_plugin()
        return
    if not any(isinstance(f, TimmImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, TimmImportHook())
