"""Every third-party module the project imports is a declared dependency (a fresh machine installs only those)."""
import ast
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip('tomllib', reason='tomllib is in the standard library from Python 3.11')

REPO = Path(__file__).resolve().parents[1]
LOCAL = {'timm_inception_pcam', 'export', 'benchmarks', 'tests', '_timm_inception_pcam_autoload'} | {
    p.stem for p in (REPO / 'tests').glob('*.py')}  # helper modules beside the tests
# Modules whose distribution is named otherwise and may not be installed here (GPU-only extras).
KNOWN = {'tensorrt': 'tensorrt', 'pycuda': 'pycuda', 'cuda': 'cuda-python', 'PIL': 'pillow',
         'sklearn': 'scikit-learn', 'openslide': 'openslide-python', 'yaml': 'pyyaml'}


def _normalize(name: str) -> str:
    return re.sub(r'[-_.]+', '-', name).lower()


def _declared() -> tuple[set[str], set[str]]:
    """(core dependency names, names of every dependency including the optional extras)."""
    project = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']

    def names(reqs: list[str]) -> set[str]:
        return {_normalize(re.split(r'[\s<>=!~;\[]', r, maxsplit=1)[0]) for r in reqs}

    core = names(project['dependencies'])
    return core, core.union(*(names(v) for v in project.get('optional-dependencies', {}).values()))


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(top-level modules imported at module level, those imported anywhere) by one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module_level, anywhere = set(), set()
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module]
        else:
            continue
        tops = {m.split('.')[0] for m in mods}
        anywhere |= tops
        if id(node) not in nested:
            module_level |= tops
    return module_level, anywhere


@functools.cache
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions(module: str) -> set[str]:
    """Distributions that provide `module` (a namespace such as `cuda` has several) and its known umbrella name."""
    found = {_normalize(d) for d in _installed().get(module, [])}
    return found | {_normalize(KNOWN[module])} if module in KNOWN else found or {_normalize(module)}


def _third_party(modules: set[str]) -> set[str]:
    return {m for m in modules if m not in sys.stdlib_module_names and m not in LOCAL}


def _files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob('*.py'))


def test_every_import_is_declared() -> None:
    _, declared = _declared()
    missing = {}
    for path in _files('timm_inception_pcam', 'export', 'benchmarks', 'tests'):
        for module in _third_party(_imports(path)[1]):
            if not _distributions(module) & declared:
                missing.setdefault(f'{module} {sorted(_distributions(module))}', []).append(str(path.relative_to(REPO)))
    assert not missing, f'imported but not declared in pyproject.toml: {missing}'


def test_plugin_module_level_imports_are_core_dependencies() -> None:
    """`pip install timm-inception-pcam` alone must import the package: its module-level imports are core."""
    core, _ = _declared()
    missing = {}
    for path in _files('timm_inception_pcam'):
        for module in _third_party(_imports(path)[0]):
            if not _distributions(module) & core:
                missing.setdefault(module, []).append(str(path.relative_to(REPO)))
    assert not missing, f'imported at module level but only optional (or undeclared): {missing}'


def test_the_checker_sees_an_undeclared_import(tmp_path: Path) -> None:
    probe = tmp_path / 'probe.py'
    probe.write_text('import os\nimport numpy\n\ndef f():\n    import tifffile\n    from made_up_pkg import x\n')
    module_level, anywhere = _imports(probe)
    assert _third_party(module_level) == {'numpy'}
    assert _third_party(anywhere) == {'numpy', 'tifffile', 'made_up_pkg'}
    assert not _distributions('made_up_pkg') & _declared()[1]
    assert _distributions('PIL') & _declared()[0] == {'pillow'}
