"""`download` end to end against a local HTTP server (Range resume, md5 table, atomic names) and `decompress`."""
import gzip
import hashlib
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from timm_inception_pcam.data import (
    ChecksumError,
    PCamDataset,
    PCamFormatError,
    download_file,
    download_pcam,
    ensure_decompressed,
    split_paths,
    synthesize_pcam,
)
from timm_inception_pcam.data.__main__ import main
from timm_inception_pcam.data.download import GZ_MD5, H5_MD5
from timm_inception_pcam.errors import MissingFileError


class _Server(http.server.ThreadingHTTPServer):
    files: dict[str, bytes]
    ranges: list[str | None]
    cut_after: dict[str, int]  # first request for these names is cut after n bytes


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        name = self.path.split('?')[0].lstrip('/')
        data = self.server.files.get(name)
        header = self.headers.get('Range')
        self.server.ranges.append(header)
        if data is None:
            self.send_error(404)
            return
        start = int(header.split('=')[1].split('-')[0]) if header else 0
        if start >= len(data):
            self.send_error(416)
            return
        self.send_response(206 if header else 200)
        self.send_header('Content-Length', str(len(data) - start))
        self.end_headers()
        body = data[start:]
        cut = self.server.cut_after.pop(name, None)
        self.wfile.write(body if cut is None else body[:cut])
        self.close_connection = True


@pytest.fixture
def server(tmp_path_factory) -> Iterator[tuple[_Server, str, dict[str, str]]]:
    """Serves a tiny synthetic PCam as .h5.gz + meta CSV; yields (server, base url, md5 table)."""
    src = tmp_path_factory.mktemp('origin')
    files = synthesize_pcam(src, 24, seed=7, n_valid=8, n_test=8, gzip=True)
    srv = _Server(('127.0.0.1', 0), _Handler)
    srv.files = {p.name: p.read_bytes() for p in files.values()}
    srv.ranges, srv.cut_after = [], {}
    table = {name: hashlib.md5(data).hexdigest() for name, data in srv.files.items() if name.endswith('.gz')}
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, f'http://127.0.0.1:{srv.server_address[1]}', table
    srv.shutdown()
    srv.server_close()


def test_download_resumes_verifies_and_decompresses(server, tmp_path: Path) -> None:
    srv, url, table = server
    big = 'camelyonpatch_level_2_split_train_x.h5.gz'
    srv.cut_after[big] = len(srv.files[big]) // 3
    with pytest.raises(OSError, match='resume'):
        download_pcam(tmp_path, base_url=url, checksums=table, progress=False)
    part = tmp_path / (big + '.part')
    assert part.stat().st_size == len(srv.files[big]) // 3
    assert not (tmp_path / big).exists() and not split_paths(tmp_path, 'train')['x'].exists()

    out = download_pcam(tmp_path, base_url=url, checksums=table, progress=False)
    assert f'bytes={len(srv.files[big]) // 3}-' in srv.ranges  # resumed, not restarted
    assert len(out) == 9 and not list(tmp_path.glob('*.part')) and not list(tmp_path.glob('*.gz'))
    ds = PCamDataset(tmp_path, 'train', with_meta=True)
    assert len(ds) == 24 and [m['center_tumor_patch'] for m in ds.meta] == ds.labels.astype(bool).tolist()

    n_requests = len(srv.ranges)
    download_pcam(tmp_path, base_url=url, checksums=table, progress=False)  # complete: nothing fetched again
    assert len(srv.ranges) == n_requests


def test_checksum_mismatch_leaves_nothing(server, tmp_path: Path) -> None:
    _, url, table = server
    name = 'camelyonpatch_level_2_split_test_y.h5.gz'
    wrong = dict(table, **{name: '0' * 32})
    with pytest.raises(ChecksumError, match=rf'{name[:-3]}.*md5 {table[name]}, expected 0{{32}}'):
        download_pcam(tmp_path, ['test'], base_url=url, checksums=wrong, progress=False)
    assert not list(tmp_path.glob('*test_y*'))
    with pytest.raises(ChecksumError, match='no md5 in the checksum table'):
        download_pcam(tmp_path, ['valid'], base_url=url, checksums={}, progress=False)


def test_http_error_and_cli(server, tmp_path: Path, monkeypatch) -> None:
    srv, url, table = server
    with pytest.raises(OSError, match='HTTP 404'):
        download_file(f'{url}/missing.h5.gz', tmp_path / 'missing.h5.gz', None, progress=False)
    monkeypatch.setattr('timm_inception_pcam.data.download.GZ_MD5', table)
    assert main(['download', '--root', str(tmp_path), '--base-url', url, '--splits', 'val', '--keep-gz']) == 0
    assert PCamDataset(tmp_path, 'validation').labels.shape == (8,)
    assert (tmp_path / 'camelyonpatch_level_2_split_valid_x.h5.gz').is_file()


def test_official_tables_are_complete_and_distinct() -> None:
    for table, suffix in ((GZ_MD5, '.h5.gz'), (H5_MD5, '.h5')):
        names = [f'camelyonpatch_level_2_split_{s}_{k}{suffix}' for s in ('train', 'valid', 'test') for k in 'xy']
        assert sorted(table) == sorted(names)
        assert len(set(table.values())) == 6 and all(len(v) == 32 for v in table.values())
    # the dataset README swaps these two: the table follows torchvision's corrected values
    assert GZ_MD5['camelyonpatch_level_2_split_valid_x.h5.gz'] == 'd5b63470df7cfa627aeec8b9dc0c066e'
    assert GZ_MD5['camelyonpatch_level_2_split_test_x.h5.gz'] == 'd8c2d60d490dbd479f8199bdfa0cf6ec'


def test_decompress_checks_md5_and_crc(tmp_path: Path) -> None:
    synthesize_pcam(tmp_path, 8, seed=2, n_valid=4, n_test=4, gzip=True)
    h5 = split_paths(tmp_path, 'test')['x']
    gz = h5.with_name(h5.name + '.gz')
    good = gz.read_bytes()
    with pytest.raises(ChecksumError, match=rf'{gz.name}: md5 {hashlib.md5(good).hexdigest()}, expected f{{32}}'):
        ensure_decompressed(h5, progress=False, md5='f' * 32)
    assert not h5.exists() and not list(tmp_path.glob('.*partial*'))
    assert ensure_decompressed(h5, progress=False, md5=hashlib.md5(good).hexdigest()) == h5
    assert gzip.decompress(good) == h5.read_bytes()

    h5.unlink()
    corrupt = bytearray(good)
    corrupt[len(corrupt) // 2] ^= 0xFF  # same length, CRC no longer matches
    gz.write_bytes(bytes(corrupt))
    with pytest.raises(PCamFormatError, match='corrupt or truncated gzip'):
        ensure_decompressed(h5, progress=False)
    assert not h5.exists()

    gz.write_bytes(good)
    assert main(['decompress', '--root', str(tmp_path), '--no-md5']) == 0
    assert np.array_equal(PCamDataset(tmp_path, 'test').labels.shape, (4,))
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    with pytest.raises(MissingFileError, match=r'no camelyonpatch_level_2_split_\*\.h5\.gz file'):
        main(['decompress', '--root', str(tmp_path)])
