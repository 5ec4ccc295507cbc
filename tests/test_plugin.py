"""The plugin as unmodified timm scripts see it: start-up hook, opt-out, runner, and timm's own model test suite."""
import os
import site
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import timm

REPO = Path(__file__).resolve().parents[1]
PCAM_MODELS = ('googlenet_pcam,inception_resnet_v1_pcam,inception_resnet_v2_pcam,inception_v3_pcam,inception_v4_pcam,'
               'vgg16_bn_pcam,vgg16_pcam')
LIST_PCAM = "import sys; assert 'torch' not in sys.modules, 'torch imported at start-up'; import timm; " \
            "print(','.join(timm.list_models('*pcam*')))"


def _run(args: list[str], env_extra: dict[str, str] | None = None, cwd: Path | None = None, timeout: int = 600):
    env = {k: v for k, v in os.environ.items() if k != 'TIMM_INCEPTION_PCAM_AUTOLOAD'}
    env.update(env_extra or {})
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd or Path('/'), timeout=timeout)


def test_plain_import_timm_lists_models_without_torch_at_startup() -> None:
    result = _run([sys.executable, '-c', LIST_PCAM])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == PCAM_MODELS


def test_autoload_opt_out() -> None:
    result = _run([sys.executable, '-c', LIST_PCAM], {'TIMM_INCEPTION_PCAM_AUTOLOAD': '0'})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ''


def test_regular_install_in_fresh_venv(tmp_path: Path) -> None:
    """A non-editable install (wheel built from the repo) in a venv that sees this interpreter's packages.

    `venv --system-site-packages` run from inside a venv exposes the base interpreter's packages, not this venv's:
    the new venv gets this interpreter's site-packages as plain path entries instead (their .pth files, such as
    the editable install of this repo, are not processed, so only the regular install provides the package).
    """
    pytest.importorskip('hatchling', reason='hatchling (dev extra) is needed to build the wheel offline')
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True, timeout=300)
    python = venv / 'bin' / 'python'
    new_site = _run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])']).stdout.strip()
    (Path(new_site) / '_outer_site_packages.pth').write_text('\n'.join(site.getsitepackages()) + '\n')
    install = _run([str(python), '-m', 'pip', 'install', '--quiet', '--no-deps', '--no-build-isolation',
                    '--no-index', str(REPO)])
    assert install.returncode == 0, install.stderr
    assert (Path(new_site) / 'timm_inception_pcam_autoload.pth').is_file()
    result = _run([str(python), '-c', LIST_PCAM + "; import timm_inception_pcam; print(timm_inception_pcam.__file__)"])
    assert result.returncode == 0, result.stderr
    listed, location = result.stdout.strip().splitlines()
    assert listed == PCAM_MODELS
    assert location.startswith(str(venv))  # the regular install, not the editable one


def test_runner_runs_script_as_main_with_args(tmp_path: Path) -> None:
    script = tmp_path / 'fake_train.py'
    script.write_text(textwrap.dedent("""
        import sys
        import timm
        if __name__ == '__main__':
            print(sys.argv[1:], timm.is_model('inception_v4_pcam'), sys.path[0])
    """))
    result = _run([sys.executable, '-m', 'timm_inception_pcam.run', str(script), '--model', 'inception_v4_pcam'],
                  {'TIMM_INCEPTION_PCAM_AUTOLOAD': '0', 'PYTHONPATH': str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"['--model', 'inception_v4_pcam'] True {tmp_path}"
    missing = _run([sys.executable, '-m', 'timm_inception_pcam.run', str(tmp_path / 'nope.py')],
                   {'PYTHONPATH': str(REPO)})
    assert missing.returncode == 2 and 'error: script not found' in missing.stderr


def _timm_sdist_tests(cache: Path) -> Path:
    """timm's own tests/ from its sdist (the wheel has none), fetched once from the package registry."""
    version = timm.__version__
    target = cache / f'timm-{version}'
    if not (target / 'tests' / 'test_models.py').is_file():
        cache.mkdir(parents=True, exist_ok=True)
        dl = _run([sys.executable, '-m', 'pip', 'download', '--quiet', '--no-binary', ':all:', '--no-deps',
                   f'timm=={version}', '-d', str(cache)], timeout=300)
        archive = cache / f'timm-{version}.tar.gz'
        if dl.returncode != 0 or not archive.is_file():
            pytest.skip(f'timm {version} sdist not obtainable from the package registry: {dl.stderr.strip()[-300:]}')
        with tarfile.open(archive) as tar:
            tar.extractall(cache, filter='data')
    return target


def test_timm_own_model_suite_passes_for_pcam_models() -> None:
    """timm's tests/test_models.py, run against the plugin (`pytest -p timm_inception_pcam`).

    Deselected: the two tests that download pretrained weights from the Hub (no network here by design).
    """
    cache = Path(os.environ.get('TIMM_INCEPTION_PCAM_CACHE', Path.home() / '.cache' / 'timm-inception-pcam'))
    timm_src = _timm_sdist_tests(cache)
    result = _run([sys.executable, '-m', 'pytest', '-p', 'timm_inception_pcam', 'tests/test_models.py', '-q',
                   '-p', 'no:cacheprovider', '-k', 'pcam and not load_pretrained and not features_pretrained'],
                  cwd=timm_src, timeout=1800)
    tail = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-500:]
    assert result.returncode == 0, result.stdout[-3000:]
    assert ' passed' in tail and 'failed' not in tail
    assert int(tail.split(" passed")[0].split()[-1]) >= 65  # 7 models x 7 tests + 16 pretrained tags (default_cfgs)
