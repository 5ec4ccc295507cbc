"""One error root for user errors, and the one `cli()` wrapper every command runs under.

A user error (a missing file, a bad value, a folder in use) raises a `PCamError` subclass whose message says what
was wrong, with which file or value, and what was expected. `cli()` prints it as one line and exits 2; anything else
is a bug and keeps its traceback. Subclasses also derive from the built-in class that fits (ValueError, OSError,
RuntimeError) so `except ValueError` callers keep working. The system refusing a path (read-only, no permission, a
full disk, a file where a folder goes) is the user's to fix too: one line naming the path.
"""
import argparse
import errno
import logging
import math
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

__all__ = [
    'PCamError', 'UsageError', 'DataError', 'MissingFileError', 'TransferError', 'CheckpointError', 'ExportError',
    'InferenceError', 'OutputError', 'OutputExistsError', 'Terminated', 'ArgumentParser', 'cli', 'check_range',
]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM
_REFUSED = {  # errno -> what was expected of the path
    errno.EACCES: 'expected a path this user may use', errno.EPERM: 'expected a path this user may use',
    errno.EROFS: 'expected a writable file system', errno.ENOSPC: 'free some space or choose another location',
    errno.EDQUOT: 'free some space or choose another location', errno.EEXIST: 'expected a folder or nothing there',
    errno.ENOTDIR: 'expected a folder there, not a file', errno.EISDIR: 'expected a file there, not a folder',
}


class PCamError(Exception):
    """Root of every user error the project reports as one line (exit status 2)."""


class UsageError(PCamError, ValueError):
    """A value given on the command line or to an API is out of range or inconsistent."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with every option's default (unless None, False or empty: nothing to show, or the help names it), and
    descriptions and epilogs (the commands' examples) as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if not _shows_default(action) or '(default' in (action.help or '').lower():
            return action.help
        return f'{action.help or ""} (default: %(default)s)'.lstrip()


def _shows_default(action: argparse.Action) -> bool:
    default = action.default
    flag = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)  # store_true / _false ...
    return bool(action.option_strings) and not (flag or default is None or default is False
                                                 or default is argparse.SUPPRESS or default in ([], {}, ''))


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with one-line usage errors (`prog: error: message (see prog --help)`, exit 2) rather than
    the whole usage text first, and `HelpFormatter`'s help; every command builds its parser with it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault('formatter_class', HelpFormatter)
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        for action in self._actions:  # an option without help still shows its default
            if action.help is None and _shows_default(action):
                action.help = '(default: %(default)s)'
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        option = re.match(r'argument (--[\w-]+)(?:/[-\w]+)*: expected one argument$', message)
        if option:  # `--shard -1/2`: argparse takes a value starting with '-' for an option and says nothing of it
            message += f' (one that starts with \'-\' is written {option.group(1)}=VALUE)'
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


class DataError(PCamError, ValueError):
    """A data file or folder is missing, truncated, corrupt or not in the expected layout."""


class MissingFileError(DataError, FileNotFoundError):
    """A file or folder the command needs does not exist."""


class TransferError(PCamError, OSError):
    """A download failed (HTTP error, no connection, dropped transfer); partial data is kept for a resume."""


class CheckpointError(PCamError, ValueError):
    """A checkpoint, weights file or model config cannot be used."""


class ExportError(PCamError, RuntimeError):
    """An export step cannot proceed (missing tool, bad artefact, parity failure)."""


class InferenceError(PCamError, RuntimeError):
    """An inference backend cannot run what it was given."""


class OutputError(PCamError, OSError):
    """An output folder cannot be used: in use by another run, holding a finished run, or not writable."""


class OutputExistsError(OutputError, FileExistsError):
    """An output path already holds something this run must not overwrite (another run's outputs, other data)."""


def check_range(name: str, value: float | int | None, low: float | None = None, high: float | None = None,
                *, low_open: bool = False) -> None:
    """Raise UsageError unless low <= value <= high (low < value with `low_open`) and finite; None passes."""
    if value is None:
        return
    if value in (math.inf, -math.inf):
        raise UsageError(f'{name} must be a finite number, got {value}')
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high or value != value:  # value != value: NaN
        lo = '' if low is None else f'{">" if low_open else ">="} {low}'
        hi = '' if high is None else f'<= {high}'
        expected = ' and '.join(s for s in (lo, hi) if s)
        raise UsageError(f'{name} must be {expected}, got {value}')


OWN_LOGGERS = ('timm_inception_pcam', 'export', 'benchmarks', '__main__')


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, SLURM's scancel or preemption, Kubernetes, Ray) raised in the main thread: every
    `except KeyboardInterrupt` / `finally` path (progress saved, staging removed, lock released) runs as for Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    previous = sys.unraisablehook

    def quiet(unraisable: Any) -> None:  # `timeout` and SLURM signal the whole group: the DataLoader workers too
        if not re.search(r'DataLoader worker \(pid[^)]*\) is killed by signal: Terminated', str(unraisable.exc_value)):
            previous(unraisable)

    sys.unraisablehook = quiet  # the process is ending: their deaths need no traceback
    raise Terminated()


def cli(main: Callable[[Sequence[str] | None], Any], prog: str,
        argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)`: a PCamError or a refused path becomes `prog: error: message` on stderr and exit 2; Ctrl-C
    exits 130, SIGTERM 143, each after the same clean-up.

    An int returned by `main` is the exit status (e.g. export.trt's 3: no GPU here); anything else means 0.
    """
    if not logging.getLogger().handlers:  # our messages at INFO; other libraries' (onnxscript's passes...) warnings
        logging.basicConfig(level=logging.WARNING, format='%(message)s', stream=sys.stderr)
        for name in OWN_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return _run(main, prog, argv)
    finally:
        if in_main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(main: Callable[[Sequence[str] | None], Any], prog: str, argv: Sequence[str] | None) -> int:
    try:
        result = main(argv)
    except PCamError as e:
        message = ' '.join(str(e).split()) or type(e).__name__
        print(f'{prog}: error: {message}', file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        if e.errno not in _REFUSED or not e.filename:
            raise
        print(f'{prog}: error: {e.filename}: {e.strerror}; {_REFUSED[e.errno]}', file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print(f'{prog}: {"terminated (SIGTERM)" if terminated else "interrupted"}; nothing half-written was left '
              f'visible (what was saved is kept: commands with --resume continue from it)', file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
