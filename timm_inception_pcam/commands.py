"""Console scripts (`[project.scripts]` in pyproject.toml): `pcam-train`, `pcam-eval`, ... beside `python -m`.

Each runs the same `main(argv)` as its `python -m` form, under the one `errors.cli` wrapper (a user error is one
line and exit status 2). The command modules are imported only when their script runs.
"""
import importlib
import sys
from collections.abc import Callable, Sequence

from .errors import cli

__all__ = ['SCRIPTS']

# script name -> (module with main(argv), the prog name its messages carry)
SCRIPTS: dict[str, tuple[str, str]] = {
    'pcam-data': ('timm_inception_pcam.data.__main__', 'pcam-data'),
    'pcam-train': ('timm_inception_pcam.train', 'pcam-train'),
    'pcam-eval': ('timm_inception_pcam.evaluate', 'pcam-eval'),
    'pcam-slide': ('timm_inception_pcam.wsi.cli', 'pcam-slide'),
    'pcam-cohort': ('timm_inception_pcam.cohort', 'pcam-cohort'),
    'pcam-publish': ('timm_inception_pcam.hub.cli', 'pcam-publish'),
    'pcam-pipeline': ('timm_inception_pcam.pipeline', 'pcam-pipeline'),
    'pcam-serve-client': ('timm_inception_pcam.serve_client', 'pcam-serve-client'),
    'pcam-export-onnx': ('export.onnx', 'pcam-export-onnx'),
    'pcam-export-trt': ('export.trt', 'pcam-export-trt'),
    'pcam-export-openvino': ('export.openvino', 'pcam-export-openvino'),
    'pcam-export-triton': ('export.triton', 'pcam-export-triton'),
}


def _script(name: str) -> Callable[[Sequence[str] | None], int]:
    module, prog = SCRIPTS[name]

    def run(argv: Sequence[str] | None = None) -> int:
        main = importlib.import_module(module).main
        return cli(main, prog, argv)

    run.__name__ = run.__qualname__ = name.replace('-', '_')
    run.__doc__ = f'`{name}`: `python -m {module.removesuffix(".__main__")}`'
    return run


def _entry(name: str) -> Callable[[], None]:
    def entry() -> None:
        sys.exit(_script(name)(None))
    return entry


pcam_data = _entry('pcam-data')
pcam_train = _entry('pcam-train')
pcam_eval = _entry('pcam-eval')
pcam_slide = _entry('pcam-slide')
pcam_cohort = _entry('pcam-cohort')
pcam_publish = _entry('pcam-publish')
pcam_pipeline = _entry('pcam-pipeline')
pcam_serve_client = _entry('pcam-serve-client')
pcam_export_onnx = _entry('pcam-export-onnx')
pcam_export_trt = _entry('pcam-export-trt')
pcam_export_openvino = _entry('pcam-export-openvino')
pcam_export_triton = _entry('pcam-export-triton')
