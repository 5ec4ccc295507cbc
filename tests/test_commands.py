"""The console scripts pyproject.toml declares: each names a command that exists and behaves as its `python -m` form."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from timm_inception_pcam import commands

tomllib = pytest.importorskip('tomllib', reason='tomllib is in the standard library from Python 3.11')
REPO = Path(__file__).resolve().parents[1]


def _declared() -> dict[str, str]:
    return tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['scripts']


def test_every_script_is_declared_and_resolves() -> None:
    declared = _declared()
    assert set(declared) == set(commands.SCRIPTS)
    for name, target in declared.items():
        module, attr = target.split(':')
        assert module == 'timm_inception_pcam.commands' and callable(getattr(commands, attr)), name


@pytest.mark.parametrize('name', sorted(commands.SCRIPTS))
def test_script_help_and_user_error(name: str, capsys: pytest.CaptureFixture) -> None:
    run = commands._script(name)
    with pytest.raises(SystemExit) as exit_info:
        run(['--help'])
    assert exit_info.value.code == 0 and 'usage:' in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors: one line too, not the usage text first
        run(['--no-such-option', 'x'])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert ': error: ' in err[0] and err[0].endswith(' --help)') and 'usage:' not in err[0]


def test_option_value_starting_with_a_dash_says_how_to_write_it(capsys: pytest.CaptureFixture) -> None:
    """`--shard -1/2` read as two options; argparse's 'expected one argument' alone does not say why."""
    with pytest.raises(SystemExit, match='2'):
        commands._script('pcam-cohort')(['--shard', '-1/2', 'a.tif'])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --shard: expected one argument (one that starts with '-' is written " \
        '--shard=VALUE)' in err[0], err


def test_installed_script_reports_a_user_error_in_one_line(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / 'pcam-data'
    if not script.is_file():
        pytest.skip(f'{script} is not installed (the package was installed without its scripts)')
    proc = subprocess.run([str(script), 'info', '--root', str(tmp_path / 'missing')], capture_output=True,
                          text=True, timeout=300, env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f'pcam-data: error: {tmp_path / "missing"}: folder not found; '
                                                'expected a folder holding the PCam files']
