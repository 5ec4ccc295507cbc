"""`convert`: ImageFolder PNG tree and webdataset shards that timm's own create_dataset / create_loader read."""
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from timm_inception_pcam.constants import PCAM_MEAN, PCAM_STD
from timm_inception_pcam.data import PCamDataset, PCamFormatError, convert_pcam, synthesize_pcam
from timm_inception_pcam.data.__main__ import main
from timm_inception_pcam.data.convert import CLASS_DIRS, MARKER
from timm_inception_pcam.errors import OutputError

timm_data = pytest.importorskip('timm.data')


@pytest.fixture(scope='module')
def h5_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('h5')
    synthesize_pcam(root, 40, seed=11, n_valid=20, n_test=12)
    return root


def _loader(dataset, batch_size: int, is_training: bool):
    return timm_data.create_loader(dataset, input_size=(3, 96, 96), batch_size=batch_size, is_training=is_training,
                                   use_prefetcher=False, num_workers=0, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                                   hflip=0.5, vflip=0.5, mean=PCAM_MEAN, std=PCAM_STD, crop_pct=1.0)


def test_folder_is_lossless_and_read_by_timm(h5_root: Path, tmp_path: Path) -> None:
    out = tmp_path / 'folder'
    record = convert_pcam(h5_root, out, 'folder', workers=2, chunk=8, progress=False)
    assert record['complete'] and record['counts']['validation'] == {CLASS_DIRS[0]: 10, CLASS_DIRS[1]: 10}
    ds = PCamDataset(h5_root, 'test')
    png = out / 'test' / CLASS_DIRS[ds.labels[5]] / 'test_000005.png'
    np.testing.assert_array_equal(np.asarray(Image.open(png)), ds[5][0])  # PNG: bit-exact

    train = timm_data.create_dataset('', root=str(out), split='train', is_training=True)
    assert train.reader.class_to_idx == {CLASS_DIRS[0]: 0, CLASS_DIRS[1]: 1}
    images, targets = next(iter(_loader(train, 8, True)))
    assert images.shape == (8, 3, 96, 96) and images.dtype == torch.float32
    val = timm_data.create_dataset('', root=str(out), split='validation', is_training=False)
    got = np.concatenate([t.numpy() for _, t in _loader(val, 8, False)])
    assert sorted(got.tolist()) == sorted(PCamDataset(h5_root, 'valid').labels.tolist())


def test_wds_shards_read_by_timm(h5_root: Path, tmp_path: Path) -> None:
    out = tmp_path / 'wds'
    assert main(['convert', '--data-dir', str(h5_root), '--output', str(out), '--format', 'wds',
                 '--shard-size', '16', '-j', '2']) == 0
    info = json.loads((out / '_info.json').read_text())
    assert info['splits']['train']['shard_lengths'] == [16, 16, 8]
    val = timm_data.create_dataset('wds/pcam', root=str(out), split='validation', is_training=False, batch_size=4)
    got, first = [], None
    for images, targets in _loader(val, 4, False):
        first = images if first is None else first
        got += targets.tolist()
    labels = PCamDataset(h5_root, 'valid').labels
    assert sorted(got) == sorted(labels.tolist()) and len(got) == 20
    expected = (torch.from_numpy(PCamDataset(h5_root, 'valid')[0][0]).permute(2, 0, 1).float() / 255
                - torch.tensor(PCAM_MEAN)[:, None, None]) / torch.tensor(PCAM_STD)[:, None, None]
    torch.testing.assert_close(first[0], expected)  # first sample of the first shard, unshuffled in eval
    train = timm_data.create_dataset('wds/pcam', root=str(out), split='train', is_training=True, batch_size=8)
    images, targets = next(iter(_loader(train, 8, True)))
    assert images.shape == (8, 3, 96, 96) and set(targets.tolist()) <= {0, 1}


def test_resume_and_refusals(h5_root: Path, tmp_path: Path) -> None:
    out = tmp_path / 'folder'
    convert_pcam(h5_root, out, 'folder', splits=['test'], workers=1, progress=False)
    marker = json.loads((out / MARKER).read_text())
    # simulate an interruption: some PNGs missing, record not complete
    removed = sorted((out / 'test').rglob('*.png'))[:5]
    for p in removed:
        p.unlink()
    (out / MARKER).write_text(json.dumps(dict(marker, complete=False)))
    record = convert_pcam(h5_root, out, 'folder', splits=['test'], workers=1, progress=False)
    assert record['complete'] and record['written_now'] == 5 and all(p.is_file() for p in removed)
    again = convert_pcam(h5_root, out, 'folder', splits=['test'], progress=False)
    assert again['complete'] and again['written_now'] == 0  # done before: nothing written now (it said 5)

    other = tmp_path / 'other'
    synthesize_pcam(other, 40, seed=12, n_valid=20, n_test=12)
    with pytest.raises(FileExistsError, match=r"already holds a different conversion \('folder' of splits test; "
                                              r"this one: 'folder' of test; the source files differ in test\)"):
        convert_pcam(other, out, 'folder', splits=['test'], progress=False)
    with pytest.raises(FileExistsError, match='already holds a different conversion'):
        convert_pcam(h5_root, out, 'wds', splits=['test'], progress=False)

    stray = tmp_path / 'stray'
    stray.mkdir()
    (stray / 'notes.txt').write_text('x')
    with pytest.raises(FileExistsError, match='not empty and has no'):
        convert_pcam(h5_root, stray, 'folder', progress=False)

    # a conversion under way (its .lock names a live process) is not joined, whether it has written a record yet or not
    live = f'{os.getppid()} {socket.gethostname()}\n'
    (out / MARKER).write_text(json.dumps(dict(marker, complete=False)))
    (out / '.lock').write_text(live)
    (tmp_path / 'starting').mkdir()
    (tmp_path / 'starting' / '.lock').write_text(live)
    for folder in (out, tmp_path / 'starting'):
        with pytest.raises(OutputError, match='in use by another run'):
            convert_pcam(h5_root, folder, 'folder', splits=['test'], workers=1, progress=False)
    assert json.loads((out / MARKER).read_text())['complete'] is False
    (out / '.lock').unlink()

    # a foreign file in a class folder makes the verified count fail, and the record stays incomplete
    (out / MARKER).write_text(json.dumps(dict(marker, complete=False)))
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(out / 'test' / CLASS_DIRS[0] / 'extra.png')
    with pytest.raises(PCamFormatError, match=r'7 PNG files after conversion, expected 6'):
        convert_pcam(h5_root, out, 'folder', splits=['test'], progress=False)
    assert json.loads((out / MARKER).read_text())['complete'] is False
    with pytest.raises(ValueError, match='unknown convert format'):
        convert_pcam(h5_root, tmp_path / 'x', 'jpeg')


@pytest.mark.skipif(not Path('/proc/self').exists(), reason='reads process states from /proc (Linux)')
def test_conversion_workers_end_when_their_parent_is_killed(tmp_path: Path) -> None:
    """A `kill -9` of the command must not leave its pool workers waiting for chunks forever (without the
    initializer, a ProcessPoolExecutor worker outlives its parent indefinitely)."""
    import signal
    import subprocess
    import sys
    import time

    script = ('import os\n'
              'from concurrent.futures import ProcessPoolExecutor\n'
              'from timm_inception_pcam.data.convert import _exit_with_parent\n'
              'pool = ProcessPoolExecutor(1, initializer=_exit_with_parent, initargs=(os.getpid(),))\n'
              'print(pool.submit(os.getpid).result(), flush=True)\n'
              'os._exit(0)\n')  # gone without a word to its worker, like a kill -9
    out = tmp_path / 'pid.txt'
    with open(out, 'w') as f:  # a file, not a pipe: an orphaned worker would hold a pipe open
        subprocess.run([sys.executable, '-c', script], stdout=f, timeout=120, check=True)
    pid = int(out.read_text().split()[0])

    def alive() -> bool:
        try:
            return 'State:\tZ' not in Path(f'/proc/{pid}/status').read_text()
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 15
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive():
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f'worker {pid} outlived its parent')
