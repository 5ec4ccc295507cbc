"""Fetching the official PCam files from the Zenodo mirror (record 2546921): resumable, md5-verified, atomic.

A download goes to `<name>.part` (never a name that looks complete), resumes with an HTTP Range request after an
interruption, and is renamed to its final name only when its md5 matches the table. The `.h5.gz` files are then
stream-decompressed beside themselves (see `ensure_decompressed`).

Checksums. The dataset README lists the md5 values of the valid and test files swapped (acknowledged upstream), so
the table below does not come from it:
- `.h5.gz` md5: torchvision's `PCAM._FILES` (torchvision 0.29.1; it verifies the archives it downloads).
- `.h5` md5 (decompressed): eva's PatchCamelyon loader (kaiko-ai/eva), which checks the extracted files.
- `_meta.csv`: no md5 could be confirmed from either loader, so the meta files are checked by parsing only
  (header and one row per patch), not by checksum.
"""
import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

from tqdm import tqdm

from ..errors import TransferError
from .files import ChecksumError, normalize_split, split_file

__all__ = ['ZENODO_URL', 'GZ_MD5', 'H5_MD5', 'file_md5', 'download_file', 'download_pcam']

ZENODO_URL = 'https://zenodo.org/records/2546921/files'

GZ_MD5: dict[str, str] = {
    'camelyonpatch_level_2_split_train_x.h5.gz': '1571f514728f59376b705fc836ff4b63',
    'camelyonpatch_level_2_split_train_y.h5.gz': '35c2d7259d906cfc8143347bb8e05be7',
    'camelyonpatch_level_2_split_valid_x.h5.gz': 'd5b63470df7cfa627aeec8b9dc0c066e',
    'camelyonpatch_level_2_split_valid_y.h5.gz': '2b85f58b927af9964a4c15b8f7e8f179',
    'camelyonpatch_level_2_split_test_x.h5.gz': 'd8c2d60d490dbd479f8199bdfa0cf6ec',
    'camelyonpatch_level_2_split_test_y.h5.gz': '60a7035772fbdb7f34eb86d4420cf66a',
}
H5_MD5: dict[str, str] = {
    'camelyonpatch_level_2_split_train_x.h5': '01844da899645b4d6f84946d417ba453',
    'camelyonpatch_level_2_split_train_y.h5': '0781386bf6c2fb62d58ff18891466aca',
    'camelyonpatch_level_2_split_valid_x.h5': '81cf9680f1724c40673f10dc88e909b1',
    'camelyonpatch_level_2_split_valid_y.h5': '94d8aacc249253159ce2a2e78a86e658',
    'camelyonpatch_level_2_split_test_x.h5': '2614b2e6717d6356be141d9d6dbfcb7e',
    'camelyonpatch_level_2_split_test_y.h5': '11ed647efe9fe457a4eb45df1dba19ba',
}
_CHUNK = 1 << 20


def file_md5(path: str | os.PathLike, progress: bool = False) -> str:
    path = Path(path)
    digest = hashlib.md5()
    with open(path, 'rb') as f, tqdm(total=path.stat().st_size, unit='B', unit_scale=True, leave=False,
                                     desc=f'md5 {path.name}', disable=not progress) as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def download_file(url: str, dest: str | os.PathLike, md5: str | None, progress: bool = True,
                  timeout: float = 60.0) -> Path:
    """Download `url` to `dest` via `dest.part`, resuming a previous partial download with an HTTP Range request.

    The `.part` file is renamed to `dest` only after its md5 matches `md5` (skipped when `md5` is None); on a
    mismatch it is deleted and ChecksumError names the file, the md5 found and the one expected.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + '.part')
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={'Range': f'bytes={have}-'} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:  # 416: nothing left to fetch, the part file may already be whole
            raise TransferError(f'{url}: HTTP {e.code} {e.reason} while downloading {dest.name}') from e
        response = None
    except urllib.error.URLError as e:
        kept = f'partial data kept in {part.name}, run' if have else 'run'
        raise TransferError(f'{url}: cannot connect ({e.reason}) while downloading {dest.name}; {kept} the command '
                            f'again to resume') from e
    if response is not None:
        with response:
            resumed = have and response.status == 206
            if have and not resumed:
                have = 0  # server ignored the Range header: start over
            length = response.headers.get('Content-Length')
            total = have + int(length) if length is not None else None
            with open(part, 'ab' if resumed else 'wb') as f, tqdm(total=total, initial=have, unit='B', unit_scale=True,
                                                                  desc=dest.name, disable=not progress) as bar:
                try:
                    shutil.copyfileobj(_Progress(response, bar), f, _CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    raise TransferError(f'{url}: transfer of {dest.name} interrupted ({type(e).__name__}: {e}); '
                                        f'partial data kept in {part.name}, run the command again to resume') from e
            size = part.stat().st_size
            if total is not None and size != total:
                raise TransferError(f'{url}: connection closed after {size} of {total} bytes of {dest.name}; '
                                    f'partial data kept in {part.name}, run the command again to resume')
    if md5 is not None:
        found = file_md5(part, progress=progress)
        if found != md5.lower():
            part.unlink()
            raise ChecksumError(f'{dest}: md5 {found}, expected {md5.lower()}; the download was deleted '
                                f'(corrupt, or not the official file): run the command again')
    os.replace(part, dest)
    return dest


class _Progress:
    """File-like wrapper updating a tqdm bar on every read."""

    def __init__(self, f, bar: tqdm) -> None:
        self.f, self.bar = f, bar

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.bar.update(len(data))
        return data


def download_pcam(root: str | os.PathLike, splits: Iterable[str] = ('train', 'valid', 'test'),
                  base_url: str = ZENODO_URL, checksums: Mapping[str, str | None] | None = None,
                  decompress: bool = True, keep_gz: bool = False, meta: bool = True,
                  progress: bool = True) -> dict[str, Path]:
    """Fetch (and by default decompress) the official files of `splits` into `root`; returns {name: path}.

    `checksums` maps each `.h5.gz` file name to its md5 (default `GZ_MD5`); a name absent from the table is
    refused rather than trusted unless it maps to None explicitly. Files already present and complete are kept.
    """
    from .pcam import check_split_files, ensure_decompressed, read_meta_rows

    root = Path(root)
    table = dict(GZ_MD5 if checksums is None else checksums)
    base_url = base_url.rstrip('/')
    out: dict[str, Path] = {}
    for split in dict.fromkeys(normalize_split(s) for s in splits):
        for key in ('x', 'y'):
            h5 = root / split_file(split, key)
            gz_name = h5.name + '.gz'
            if h5.is_file():
                out[h5.name] = h5
                continue
            if gz_name not in table:
                raise ChecksumError(f'{gz_name}: no md5 in the checksum table (has {sorted(table)}); refusing to '
                                    f'download a file that cannot be verified')
            gz = root / gz_name
            md5 = table[gz_name]
            if not gz.is_file():
                download_file(f'{base_url}/{gz_name}?download=1', gz, md5, progress=progress)
            if decompress:
                # the md5 was verified on download; a .gz found on disk is verified while decompressing
                ensure_decompressed(h5, progress=progress, md5=md5)
                out[h5.name] = h5
                if not keep_gz:
                    gz.unlink()
            else:
                out[gz_name] = gz
        if decompress:
            n, _ = check_split_files(root / split_file(split, 'x'), root / split_file(split, 'y'))
        if meta:
            path = root / split_file(split, 'meta')
            if not path.is_file():
                download_file(f'{base_url}/{path.name}?download=1', path, None, progress=progress)
            try:
                read_meta_rows(path, n if decompress else None)
            except Exception:
                path.unlink()  # not a meta CSV: do not leave it looking complete
                raise
            out[path.name] = path
    return out
