"""Small file helpers used by every command that writes artefacts: atomic writes, checksums, and run folders owned by
one process at a time (`claim_output_dir`)."""
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import OutputError

__all__ = ['atomic_path', 'atomic_write_bytes', 'atomic_write_json', 'staging_dir', 'staged_outputs', 'file_sha256',
           'check_output_folder', 'claim_output_dir', 'remove_path']


def _process_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# Read once at import: os.umask can only be read by setting it, which is not safe once other threads create files.
_UMASK = _process_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = '') -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block completes.

    `suffix` keeps an extension on the temporary name for writers that insist on one (e.g. '.png').
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix=f'.partial{suffix}', dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():  # mkstemp makes files private (0600): give the result the usual umask-based mode
            tmp_path.chmod(0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def staging_dir(parent: str | os.PathLike, name: str) -> Path:
    """A new hidden folder `.NAME.XXXXXXXX.partial` in `parent` (created) for a folder renamed onto `parent/NAME`
    when complete, with the usual umask-based mode (mkdtemp's 0700 made such a folder unreadable to other users)."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f'.{name}.', suffix='.partial', dir=parent))
    folder.chmod(0o777 & ~_UMASK)
    return folder


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + '\n').encode())


STAGING_PREFIX = '.outputs.'  # staged_outputs' folders: '.outputs.XXXXXXXX.partial'
PUBLISHING = '.publishing.json'  # in a staging folder: its files are being moved in (finish the move if interrupted)


@contextlib.contextmanager
def staged_outputs(folder: str | os.PathLike, *, last: str, stale: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a new hidden folder inside `folder` to write a run's output files into; they appear in `folder` together.

    When the block completes, the files are published: `last` (the run's completion marker, e.g. 'report.json') is
    deleted from `folder`, every file written in the staging folder is moved onto its name in `folder`, the names in
    `stale` this run did not write are deleted, and `last` is moved in at the end. A publication interrupted half-way
    (the process killed between two renames) is finished by the next `claim_output_dir` on `folder`, so a folder
    never keeps a mix of two runs. When the block raises (a full disk, a bug, Ctrl-C), the staging folder is
    deleted: nothing of the run becomes visible and the previous run's files are left as they were; one left by a
    killed run is deleted by the next `claim_output_dir`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, suffix='.partial', dir=folder))
    publishing = False
    try:
        yield staging
        names = sorted(p.name for p in staging.iterdir())
        if last not in names:
            raise RuntimeError(f'staged_outputs: the run wrote no {last} in {staging}')
        atomic_write_json(staging / PUBLISHING, {'last': last, 'names': names, 'stale': list(stale)})
        publishing = True
        _publish(folder, staging)
        publishing = False
    finally:
        if not publishing:  # else interrupted while publishing: the next claim finishes it
            shutil.rmtree(staging, ignore_errors=True)


def _publish(folder: Path, staging: Path) -> None:
    """Move the files of `staging` into `folder` as its PUBLISHING record says; repeatable after an interruption."""
    plan = json.loads((staging / PUBLISHING).read_text())
    last = plan['last']
    if (staging / last).exists():  # else the marker is in: published, only the staging folder was left
        (folder / last).unlink(missing_ok=True)
        for name in plan['names']:
            if name != last and (staging / name).exists():
                os.replace(staging / name, folder / name)
        for name in plan['stale']:
            if name not in plan['names']:
                (folder / name).unlink(missing_ok=True)
        os.replace(staging / last, folder / last)


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


LOCK_NAME = '.lock'
ASIDE_NAME = '.replaced.partial'  # claim_output_dir(overwrite=True): the previous run, until the new one replaced it
PARTIAL_GLOB = '.*.partial*'  # atomic_path's temporary names


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read_lock(lock: Path) -> tuple[int | None, str]:
    """(pid, host) recorded in a lock file; pid None when unreadable."""
    try:
        fields = lock.read_text().split()
        return int(fields[0]), fields[1] if len(fields) > 1 else ''
    except (OSError, ValueError, IndexError):
        return None, ''


def _take_lock(lock: Path, option: str) -> None:
    """Create `lock` holding this process's pid and host; take over a lock whose process is gone."""
    import socket

    me = f'{os.getpid()} {socket.gethostname()}\n'
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid, host = _read_lock(lock)
            if pid is None:  # being written this instant, or garbage: look again before judging
                time.sleep(0.05)
                pid, host = _read_lock(lock)
            if host and host != socket.gethostname():
                raise OutputError(f'{option} {lock.parent} is in use by process {pid} on host {host} (lock file '
                                  f'{lock}); wait for it, choose another {option}, or delete the lock file if that '
                                  'run is gone') from None
            in_use = OutputError(f'{option} {lock.parent} is in use by another run (pid {pid}, lock file {lock}); '
                                 f'wait for it to finish or choose another {option}')
            if pid is not None and _pid_alive(pid):
                raise in_use from None
            # Stale: move it aside (one process wins the rename), and check it is the lock that was judged, not a
            # fresh one another process created meanwhile (then put that back and yield to it).
            aside = lock.with_name(f'{lock.name}.stale.{os.getpid()}')
            try:
                os.rename(lock, aside)
            except FileNotFoundError:
                continue
            if _read_lock(aside)[0] != pid:
                with contextlib.suppress(FileExistsError):
                    os.link(aside, lock)
                aside.unlink()
                raise in_use from None
            aside.unlink()
            logging.getLogger(__name__).info('taking over %s: its process %s is gone', lock, pid)
            continue
        with os.fdopen(fd, 'w') as f:
            f.write(me)
        return
    raise OutputError(f'{option} {lock.parent}: could not take the lock file {lock} (another run keeps taking it)')


def remove_path(target: Path) -> None:
    """Delete a file, link or folder tree; nothing when there is nothing."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()


def _settle_aside(path: Path, marker: str | None, replaces: Sequence[str]) -> None:
    """Resolve `path/ASIDE_NAME` (the previous run's entries, put aside by an --overwrite run that failed or was
    killed): if the new run wrote `marker` it replaced the old one, which is deleted; otherwise what the new run
    wrote of `replaces` is deleted and the old entries are moved back."""
    aside = path / ASIDE_NAME
    if marker is not None and (path / marker).exists():
        shutil.rmtree(aside)
        return
    old = sorted(aside.iterdir())
    for name in {*replaces, *(entry.name for entry in old)}:
        remove_path(path / name)
    for entry in old:
        os.replace(entry, path / entry.name)
    aside.rmdir()
    logging.getLogger(__name__).warning('%s: the replacing run did not finish; the previous run is back', path)


def check_output_folder(path: str | os.PathLike, option: str = '--output') -> Path:
    """`path` as a Path; OutputError when it names an existing file where a folder (new or a run's) goes."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f'{option} {path} is an existing file; expected a folder (new or a previous run\'s)')
    return path


@contextlib.contextmanager
def claim_output_dir(path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False,
                     finished: Sequence[str] = (), replaces: Sequence[str] = (), option: str = '--output',
                     resume_hint: str = '') -> Iterator[Path]:
    """Own the run folder `path` for the duration of the block; raises OutputError when it cannot be used.

    - A folder another live process holds (`path/.lock` with its pid) is refused; a lock whose process is gone
      (killed run) is taken over. The lock is removed when the block ends.
    - A folder holding one of the names in `finished` (what a completed or resumable run leaves, e.g. `last.pth`)
      is refused unless `resume` (continue it) or `overwrite` (replace the names in `replaces`: start afresh);
      the message names both options (`resume_hint`, e.g. '--resume runs/x/last.pth to continue it', is omitted
      when the command cannot resume).
    - Overwriting moves the names in `replaces` aside (a hidden folder in `path`) rather than deleting them; they
      are deleted when the block completes. When it fails (or its process is killed: the next claim sees to it),
      they are deleted too if the new run has written the first name in `finished` (e.g. its first `last.pth`),
      which makes it the run to continue; otherwise the new run's copies are deleted and the previous run comes
      back as it was.
    - Temporary files of `atomic_path` and folders of `staged_outputs` left in the folder by a killed run
      (`.NAME.*.partial*`) are deleted, after finishing a publication of `staged_outputs` the run had begun.
    - `path` naming an existing file is refused; a folder this call created and the block left empty is removed.

    Commands call it once, on their top-level output folder (under DDP, rank 0 only).
    """
    path = check_output_folder(path, option)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f'{option} {path}: cannot create the folder ({e.strerror or e})') from e
    lock = path / LOCK_NAME
    _take_lock(lock, option)
    marker = finished[0] if finished else None
    aside = path / ASIDE_NAME
    try:
        if aside.is_dir():  # left by an --overwrite run that was killed
            _settle_aside(path, marker, replaces)
        for staging in path.glob(f'{STAGING_PREFIX}*.partial'):  # a killed run's: finish a publication it began
            if staging.is_dir() and not staging.is_symlink():
                if (staging / PUBLISHING).is_file():
                    logging.getLogger(__name__).warning('%s: finishing the publication of a run killed while its '
                                                        'files were being moved in', path)
                    _publish(path, staging)
                shutil.rmtree(staging)
        done = [name for name in finished if (path / name).exists()]
        if done and overwrite:
            for name in replaces:
                if (path / name).exists() or (path / name).is_symlink():
                    aside.mkdir(exist_ok=True)
                    os.replace(path / name, aside / name)
        elif done and not resume:
            hint = f'pass {resume_hint}, ' if resume_hint else 'pass '
            raise OutputError(f'{option} {path} already holds a run ({done[0]}): {hint}--overwrite to replace it, '
                              f'or choose another {option}')
        for tmp in path.glob(PARTIAL_GLOB):
            if tmp.is_file():
                tmp.unlink()
        try:
            yield path
        except BaseException:
            if aside.is_dir():
                _settle_aside(path, marker, replaces)
            raise
        if aside.is_dir():
            shutil.rmtree(aside)
    finally:
        pid, _ = _read_lock(lock)
        if pid == os.getpid():
            lock.unlink()
        if created:  # a run that wrote nothing leaves no empty folder behind
            with contextlib.suppress(OSError):
                path.rmdir()
