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


def test_a_publication_interrupted_between_two_renames_is_finished_by_the_next_claim(tmp_path, monkeypatch):
    import os

    out = tmp_path / 'run'
    out.mkdir()
    for name in ('done.json', 'a.csv', 'b.png'):
        (out / name).write_text('old')
    real_replace, moved = os.replace, []

    def killed_after_one(src, dst):
        if os.path.dirname(dst) == str(out):  # a staged file moved in (not a temporary file within the staging)
            if moved:
                raise KeyboardInterrupt  # the process stopped between two renames
            moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, 'replace', killed_after_one)
    with pytest.raises(KeyboardInterrupt), staged_outputs(out, last='done.json', stale=('b.png',)) as staging:
        for name in ('a.csv', 'done.json'):
            (staging / name).write_text('new')
    monkeypatch.undo()
    assert (out / 'a.csv').read_text() == 'new' and not (out / 'done.json').exists()  # a mix, and no marker
    with claim_output_dir(out):
        assert sorted(p.name for p in out.iterdir()) == ['.lock', 'a.csv', 'done.json']  # the new run, complete
        assert (out / 'done.json').read_text() == 'new'
