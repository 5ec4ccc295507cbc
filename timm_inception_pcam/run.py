"""Run any timm script with the PCam models registered: `python -m timm_inception_pcam.run SCRIPT.py ARGS...`.

For environments where start-up files (.pth) are disabled (`python -S`, some embedded interpreters): the script runs
as `__main__` with its own directory first on sys.path, exactly as `python SCRIPT.py ARGS...` would run it.
"""
import runpy
import sys
from pathlib import Path

import timm_inception_pcam  # noqa: F401  (registers the models)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__.strip())
        raise SystemExit(0 if argv else 2)
    script = Path(argv[0])
    if not script.is_file():
        print(f'timm_inception_pcam.run: error: script not found: {script} (expected a path to e.g. train.py)',
              file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.resolve().parent))
    runpy.run_path(str(script), run_name='__main__')


if __name__ == '__main__':
    main()
