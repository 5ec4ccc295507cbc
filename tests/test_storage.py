"""`staged_outputs`: a run's files appear together, or not at all."""
import pytest

from timm_inception_pcam.storage import claim_output_dir, staged_outputs


def test_staged_outputs_publish_together_and_drop_what_the_run_no_longer_writes(tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    for name, text in (('done.json', 'old'), ('a.csv', 'old'), ('plot.png', 'old'), ('mine.txt', 'user')):
        (out / name).write_text(text)
    with staged_outputs(out, last='done.json', stale=('a.csv', 'plot.png', 'done.json')) as staging:
        (staging / 'a.csv').write_text('new')
        (staging / 'done.json').write_text('new')
        assert (out / 'done.json').read_text() == 'old' and (out / 'a.csv').read_text() == 'old'  # not yet
    assert {p.name: p.read_text() for p in out.iterdir()} == {'done.json': 'new', 'a.csv': 'new', 'mine.txt': 'user'}


def test_staged_outputs_show_nothing_of_a_failed_run(tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'done.json').write_text('old')
    with pytest.raises(OSError, match='disk full'), staged_outputs(out, last='done.json', stale=('done.json',)) as st:
        (st / 'a.csv').write_text('new')
        raise OSError('disk full')
    assert {p.name: p.read_text() for p in out.iterdir()} == {'done.json': 'old'}
    with pytest.raises(RuntimeError, match='wrote no done.json'), staged_outputs(out, last='done.json') as st:
        (st / 'a.csv').write_text('new')  # a run that forgets its marker is a bug, and publishes nothing
    assert {p.name for p in out.iterdir()} == {'done.json'}


def test_a_killed_runs_staging_folder_is_cleared_by_the_next_claim(tmp_path):
    out = tmp_path / 'run'
    (out / '.outputs.abc.partial').mkdir(parents=True)
    (out / '.outputs.abc.partial' / 'done.json').write_text('killed')
    (out / '.keep.partial.d').mkdir()  # a folder of another writer: not ours to delete
    with claim_output_dir(out):
        assert sorted(p.name for p in out.iterdir()) == ['.keep.partial.d', '.lock']
