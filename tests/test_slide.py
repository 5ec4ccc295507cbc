"""Whole-slide inference on synthetic pyramidal TIFFs painted with the synthetic PCam generator."""
import csv
import errno
import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from timm_inception_pcam import errors, wsi
from timm_inception_pcam.data.synth_slide import write_synthetic_slide
from timm_inception_pcam.wsi import outputs
from timm_inception_pcam.wsi.cli import main
from timm_inception_pcam.wsi.run import _make_runner

pytest.importorskip('openslide', reason='whole-slide reading needs openslide-bin + openslide-python')

THUMB = 256  # small heatmap backgrounds keep the runs quick
TISSUE = np.zeros((8, 10), dtype=bool)
TISSUE[1:7, 1:9] = True
TISSUE[1, 1] = TISSUE[6, 8] = False  # a ragged outline
TUMOUR = np.zeros_like(TISSUE)
TUMOUR[2:4, 2:4] = True
TUMOUR[4:6, 6:8] = True


def darkness(patches: np.ndarray) -> np.ndarray:
    """A deterministic stand-in model: darker centre region, higher 'metastatic' probability."""
    centre = patches[:, 32:64, 32:64].astype(np.float32).mean(axis=(1, 2, 3)) / 255.0
    p = np.clip(1.6 * (1.0 - centre) - 0.3, 0.0, 1.0)
    return np.stack([1.0 - p, p], axis=1).astype(np.float32)


class Recording:
    """Wraps a predictor; keeps every patch it is given and can fail after `fail_after` calls."""

    def __init__(self, fail_after: int | None = None):
        self.patches: list[np.ndarray] = []
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise Interrupted(f'interrupted after {self.calls} batches')
        self.calls += 1
        self.patches.append(patches.copy())
        return darkness(patches)

    @property
    def n(self) -> int:
        return sum(len(p) for p in self.patches)


class Interrupted(Exception):
    pass


def options(**kw) -> wsi.SlideOptions:
    return wsi.SlideOptions(thumbnail_size=THUMB, **{'batch_size': 16, **kw})


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory) -> dict:
    """Levels at 0.486 / 0.972 / 1.944 um/px; tissue and tumour blocks painted at 0.972 (level 1)."""
    return write_synthetic_slide(tmp_path_factory.mktemp('slide') / 'synthetic.tif', TISSUE, TUMOUR, seed=1)


@torch.no_grad()
def fit_probe(model: torch.nn.Module, patches: np.ndarray, labels: np.ndarray) -> torch.nn.Module:
    """BatchNorm statistics re-estimated on `patches`, then the classifier fitted (logistic regression) on the
    frozen features: a model trained in seconds whose outputs follow the synthetic tumour cells."""
    from sklearn.linear_model import LogisticRegression

    from timm_inception_pcam.preprocess import batch_slices, model_normalization, preprocess_patches

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
    x = torch.from_numpy(preprocess_patches(patches, *model_normalization(model)))
    model.train()
    for s in batch_slices(len(x), 32):
        model(x[s])
    model.eval()
    feats = torch.cat([model.forward_head(model.forward_features(x[s]), pre_logits=True)
                       for s in batch_slices(len(x), 32)]).double().numpy()
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    clf = LogisticRegression(C=1.0, max_iter=2000).fit((feats - mu) / sd, labels)
    w = clf.coef_[0] / sd
    b = clf.intercept_[0] - w @ mu
    head = model.get_classifier()  # softmax([-z/2, z/2]) = sigmoid(z), z = w.f + b
    head.weight.copy_(torch.from_numpy(np.stack([-w / 2, w / 2])).float())
    head.bias.copy_(torch.tensor([-b / 2, b / 2], dtype=torch.float32))
    return model


@pytest.fixture(scope='module')
def probe_checkpoint(tmp_path_factory) -> Path:
    """A depths=(1, 1, 1) inception_v4_pcam fitted on 96 synthetic PCam patches (PCam's label rule)."""
    import timm

    from timm_inception_pcam.checkpoint import save_checkpoint
    from timm_inception_pcam.data.synth import render_patches, stamp_banks

    rng = np.random.default_rng(7)
    labels = np.zeros(96, dtype=np.uint8)
    labels[:48] = 1
    rng.shuffle(labels)
    patches, _ = render_patches(rng, labels, stamp_banks(rng))  # half the negatives carry ring tumour
    torch.manual_seed(0)
    model = fit_probe(timm.create_model('inception_v4_pcam', num_classes=2, depths=(1, 1, 1)), patches, labels)
    return save_checkpoint(tmp_path_factory.mktemp('probe') / 'probe.pth', model, arch='inception_v4_pcam',
                           model_kwargs={'depths': (1, 1, 1)}, data_provenance='synthetic')


def test_choose_level_uses_a_matching_level_or_resamples_from_a_finer_one():
    assert wsi.choose_level([0.243, 0.486, 0.972, 1.944]) == (2, 1.0)
    assert wsi.choose_level([0.25, 1.0, 4.0]) == (1, 1.0)  # 3 % off: used as stored
    level, resample = wsi.choose_level([0.5, 2.0, 8.0])  # 2.0 is 2x too coarse: downsample level 0
    assert level == 0 and resample == pytest.approx(0.972 / 0.5)
    level, resample = wsi.choose_level([2.0, 8.0])  # every level coarser: upsample the finest
    assert level == 0 and resample == pytest.approx(0.972 / 2.0)
    assert wsi.choose_level([0.5, 1.2], tolerance=0.25) == (1, 1.0)  # 19 % off, within a looser tolerance
    assert wsi.choose_level([0.5, 1.2], tolerance=0.1) == (0, pytest.approx(0.972 / 0.5))


def test_heatmap_finds_planted_tumour(synthetic, probe_checkpoint, tmp_path):
    out = tmp_path / 'run'
    summary = main([str(synthetic['path']), '--model', 'inception_v4_pcam', '--checkpoint', str(probe_checkpoint),
                    '--out', str(out), '--batch-size', '32', '--thumbnail-size', str(THUMB), '--no-progress'])
    assert summary['level'] == 1 and summary['resample'] == 1.0 and summary['mpp_source'] == 'metadata'
    assert summary['data_provenance'] == 'synthetic'  # the probe was fitted on synthetic patches, and says so
    prob = np.load(out / 'probability.npy')
    assert prob.shape == TISSUE.shape == tuple(summary['grid'])
    np.testing.assert_array_equal(np.isfinite(prob), TISSUE)
    inside, outside = prob[TUMOUR], prob[TISSUE & ~TUMOUR]
    assert inside.mean() > outside.mean() + 0.4, (inside.round(2), outside.round(2))

    block = synthetic['block']
    rows = list(csv.DictReader((out / 'tiles.csv').open()))
    assert len(rows) == summary['tiles_over_threshold'] == int((prob >= summary['threshold']).sum()) > 0
    for row in rows:  # level-0 coordinates of the grid cell, at twice the tile resolution
        assert (int(row['x']), int(row['y']), int(row['width'])) == (int(row['col']) * block,
                                                                     int(row['row']) * block, block)
    hits = {(int(r['row']), int(r['col'])) for r in rows}
    assert len(hits & set(map(tuple, np.argwhere(TUMOUR).tolist()))) >= 0.5 * TUMOUR.sum()  # recall
    centre = summary['max_location']
    assert any(x <= centre['x'] < x + w and y <= centre['y'] < y + h for x, y, w, h in synthetic['tumour_boxes'])
    assert summary['max_probability'] == pytest.approx(float(np.nanmax(prob)))
    assert summary['area_over_threshold_mm2'] == pytest.approx(len(rows) * (96 * 0.972e-3) ** 2)

    geo = json.loads((out / 'tiles.geojson').read_text())
    assert len(geo['features']) == len(rows)
    ring = geo['features'][0]['geometry']['coordinates'][0]
    assert ring[0] == ring[-1] and ring[2][0] - ring[0][0] == block
    with Image.open(out / 'heatmap.png') as im:
        assert im.size[0] > THUMB // 2 and im.mode in ('RGB', 'RGBA')
    saved = json.loads((out / 'summary.json').read_text())
    assert saved['tiles_over_threshold'] == len(rows) and saved['data_provenance'] == 'synthetic'
    assert saved['random_weights'] is False


def test_a_model_without_a_checkpoint_says_its_map_means_nothing(synthetic, tmp_path, capsys):
    summary = main([str(synthetic['path']), '--model', 'inception_v4_pcam', '--model-kwargs', 'depths=1,1,1',
                    '--out', str(tmp_path / 'run'), '--thumbnail-size', str(THUMB), '--no-progress'])
    captured = capsys.readouterr()
    assert 'no --checkpoint: inception_v4_pcam has random weights' in captured.err
    assert summary['random_weights'] is True and '(random weights: no checkpoint)' in captured.out


def test_background_is_never_classified(synthetic, tmp_path):
    rec = Recording()
    summary = wsi.run_slide(synthetic['path'], rec, tmp_path, options(min_tissue=0.25), progress=False)
    assert rec.n == summary['tissue_tiles'] == int(TISSUE.sum())
    patches = np.concatenate(rec.patches)
    saturation = np.stack([np.asarray(Image.fromarray(p).convert('HSV'))[..., 1] for p in patches]) / 255.0
    assert ((saturation >= 0.07).mean(axis=(1, 2)) > 0.9).all()  # every classified tile is tissue
    prob = np.load(tmp_path / 'probability.npy')
    np.testing.assert_array_equal(np.isfinite(prob), TISSUE)

    blank = write_synthetic_slide(tmp_path / 'blank.tif', np.zeros((3, 4), bool), np.zeros((3, 4), bool))
    rec = Recording()
    summary = wsi.run_slide(blank['path'], rec, tmp_path / 'blank', options(), progress=False)
    assert rec.calls == 0 and summary['tissue_tiles'] == 0 and summary['max_probability'] is None
    assert (tmp_path / 'blank' / 'tiles.csv').read_text().count('\n') == 1  # the header alone


def test_resume_after_interruption_gives_identical_results(synthetic, tmp_path):
    ref = tmp_path / 'ref'
    wsi.run_slide(synthetic['path'], Recording(), ref, options(batch_size=8), progress=False)

    out = tmp_path / 'resumed'
    with pytest.raises(Interrupted):
        wsi.run_slide(synthetic['path'], Recording(fail_after=3), out, options(batch_size=8, save_every=0),
                      progress=False)
    assert not (out / 'summary.json').exists()  # nothing claims to be complete
    with np.load(out / 'progress.npz') as z:
        done = int(z['rows_done'])
    assert 0 < done < TISSUE.shape[0]

    rec = Recording()
    summary = wsi.run_slide(synthetic['path'], rec, out, options(batch_size=8), resume=True, progress=False)
    assert summary['resumed_from_row'] == done
    assert rec.n == int(TISSUE[done:].sum()) < int(TISSUE.sum())  # finished rows are skipped
    np.testing.assert_array_equal(np.load(out / 'probability.npy'), np.load(ref / 'probability.npy'))
    assert (out / 'tiles.csv').read_bytes() == (ref / 'tiles.csv').read_bytes()
    assert (out / 'tiles.geojson').read_bytes() == (ref / 'tiles.geojson').read_bytes()

    with pytest.raises(wsi.SlideError, match='other settings.*min_tissue'):
        wsi.run_slide(synthetic['path'], Recording(), out, options(min_tissue=0.5), resume=True, progress=False)


def test_a_failed_write_shows_nothing_of_the_run_and_resume_finishes_it(synthetic, tmp_path, monkeypatch):
    out = tmp_path / 'run'
    wsi.run_slide(synthetic['path'], Recording(), out, options(), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != 'progress.npz'}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device', str(out / 'heatmap.png'))

    monkeypatch.setattr(outputs, 'plot_heatmap', full_disk)  # after the map and the tile lists are written
    with pytest.raises(OSError, match='No space left'):  # another --threshold: other tile lists, other summary
        wsi.run_slide(synthetic['path'], Recording(), out, options(threshold=0.2), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != 'progress.npz'} == before
    assert json.loads((out / 'summary.json').read_text())['threshold'] == 0.5  # the previous run, still complete

    monkeypatch.undo()
    rec = Recording()
    summary = wsi.run_slide(synthetic['path'], rec, out, options(threshold=0.2), resume=True, progress=False)
    assert rec.n == 0 and summary['threshold'] == 0.2  # every tile was classified before the write failed
    listed = list(csv.DictReader((out / 'tiles.csv').open()))
    assert listed and all(float(row['probability']) >= 0.2 for row in listed)
    assert sorted(p.name for p in out.iterdir()) == sorted(wsi.FILES.values())


def test_corrupt_or_unsupported_slide_gets_a_clear_error(synthetic, tmp_path, capsys):
    junk = tmp_path / 'junk.tif'
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(wsi.SlideError, match=r'junk\.tif: unsupported'):
        wsi.open_slide(junk)
    with pytest.raises(wsi.SlideError, match='not found'):
        wsi.open_slide(tmp_path / 'missing.svs')

    data = synthetic['path'].read_bytes()
    truncated = tmp_path / 'truncated.tif'
    truncated.write_bytes(data[:len(data) // 3])
    with pytest.raises(wsi.SlideError, match=r'truncated\.tif: .*(corrupt|unsupported|unreadable)'):
        wsi.run_slide(truncated, Recording(), tmp_path / 'out', options(), progress=False)

    damaged = bytearray(data)
    with tifffile.TiffFile(synthetic['path']) as tif:  # level 1 (the one read): every tile's data overwritten
        page = tif.pages[1]
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            damaged[offset + 2:offset + count] = b'\xff' * (count - 2)
    (tmp_path / 'damaged.tif').write_bytes(damaged)
    with pytest.raises(wsi.SlideError, match=r'damaged\.tif: cannot read level .* corrupt or truncated'):
        wsi.run_slide(tmp_path / 'damaged.tif', Recording(), tmp_path / 'out', options(), progress=False)

    code = errors.cli(main, 'slide', [str(junk), '--model', 'inception_v4_pcam', '--out', str(tmp_path / 'cli')])
    assert code == 2 and 'junk.tif' in capsys.readouterr().err
    assert not (tmp_path / 'cli' / 'summary.json').exists()


def test_resampling_and_mpp_override(synthetic, tmp_path):
    ref = wsi.run_slide(synthetic['path'], Recording(), tmp_path / 'ref', options(), progress=False)
    ref_prob = np.load(tmp_path / 'ref' / 'probability.npy')

    # One level at 0.486 um/px: every tile is resampled 2:1 from level 0 (the painting, upsampled 2x, comes back).
    flat = write_synthetic_slide(tmp_path / 'flat.tif', TISSUE, TUMOUR, seed=1, levels=1)
    summary = wsi.run_slide(flat['path'], Recording(), tmp_path / 'flat', options(), progress=False)
    assert (summary['level'], summary['resample'], summary['grid']) == (0, 2.0, ref['grid'])
    np.testing.assert_array_equal(np.load(tmp_path / 'flat' / 'probability.npy'), ref_prob)

    # No resolution in the file: refused, unless --mpp gives it.
    bare = write_synthetic_slide(tmp_path / 'bare.tif', TISSUE, TUMOUR, seed=1, write_resolution=False)
    with pytest.raises(wsi.SlideError, match='no physical resolution.*--mpp'):
        wsi.run_slide(bare['path'], Recording(), tmp_path / 'bare', options(), progress=False)
    summary = wsi.run_slide(bare['path'], Recording(), tmp_path / 'bare', options(mpp=0.486), progress=False)
    assert (summary['level'], summary['mpp_source']) == (1, '--mpp')
    np.testing.assert_array_equal(np.load(tmp_path / 'bare' / 'probability.npy'), ref_prob)

    # --mpp overrides the metadata: at 0.3 um/px no level is within 10 % of 0.972, level 1 (0.6) is downsampled.
    rec = Recording()
    summary = wsi.run_slide(synthetic['path'], rec, tmp_path / 'over', options(mpp=0.3), progress=False)
    assert summary['level'] == 1 and summary['resample'] == pytest.approx(0.972 / 0.6)
    assert summary['tile_mpp'] == pytest.approx(0.972)
    w1, h1 = 10 * 96, 8 * 96  # level 1 in pixels
    assert summary['grid'] == [int(np.ceil((h1 / summary['resample'] - 96) / 96)) + 1,
                               int(np.ceil((w1 / summary['resample'] - 96) / 96)) + 1]
    assert rec.n == summary['tissue_tiles'] > 0


def test_svs_and_overlapping_stride(synthetic, tmp_path):
    ref = wsi.run_slide(synthetic['path'], Recording(), tmp_path / 'ref', options(), progress=False)
    svs = write_synthetic_slide(tmp_path / 'synthetic.svs', TISSUE, TUMOUR, seed=1, aperio=True)
    summary = wsi.run_slide(svs['path'], Recording(), tmp_path / 'svs', options(), progress=False)
    assert (summary['vendor'], summary['mpp'], summary['level']) == ('aperio', pytest.approx(0.486), 1)
    np.testing.assert_array_equal(np.load(tmp_path / 'svs' / 'probability.npy'),
                                  np.load(tmp_path / 'ref' / 'probability.npy'))

    rec = Recording()
    half_stride = options(stride=48, min_tissue=0.4)
    summary = wsi.run_slide(synthetic['path'], rec, tmp_path / 'half', half_stride, progress=False)
    assert summary['grid'] == [2 * r - 1 for r in ref['grid']]  # (n * 96 - 96) / 48 + 1
    prob = np.load(tmp_path / 'half' / 'probability.npy')
    # a tile at stride 48 covers 2x2 half-blocks: classified when two of them (40 % is asked) are tissue
    half = TISSUE.repeat(2, axis=0).repeat(2, axis=1).astype(int)
    cover = half[:-1, :-1] + half[1:, :-1] + half[:-1, 1:] + half[1:, 1:]
    np.testing.assert_array_equal(np.isfinite(prob), cover >= 2)
    assert summary['area_over_threshold_mm2'] == pytest.approx(summary['tiles_over_threshold'] * (48 * 0.972e-3) ** 2)

    # a finished run resumed with another threshold re-lists the tiles without classifying anything again
    rec = Recording()
    again = wsi.run_slide(synthetic['path'], rec, tmp_path / 'half', replace(half_stride, threshold=0.9),
                          resume=True, progress=False)
    assert rec.calls == 0 and again['tiles_over_threshold'] == int((prob >= 0.9).sum())


def test_bf16_checked_keeps_float32_decisions_at_the_listing_threshold(probe_checkpoint):
    from contextlib import ExitStack

    with ExitStack() as stack:
        predictor, info = _make_runner(stack, None, str(probe_checkpoint), 'bf16_checked', 16,
                                       thresholds=(0.5, 0.3, 1.0))
    checked = predictor.args[0]  # functools.partial(probabilities, runner)
    assert info['backend'] == 'bf16_checked' and checked.spec.backend == 'bf16_checked'
    assert info['data_provenance'] == 'synthetic'
    assert sorted(checked.thresholds) == [0.3, 0.5]  # 1.0 decides nothing: no check needed


@pytest.mark.parametrize('backend', ['eager', 'openvino_fp32', 'openvino_bf16_checked'])
def test_every_backend_of_a_checkpoint_records_its_model(backend, probe_checkpoint):
    """summary.json said "model": null for a checkpoint on OpenVINO (auto on CPUs with bf16), eager's name."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        _, info = _make_runner(stack, None, str(probe_checkpoint), backend, 8)
    assert info['model'] == 'inception_v4_pcam' and info['backend'] == backend


def test_exported_files_keep_the_checkpoints_training_data(probe_checkpoint, tmp_path):
    """A slide scored with the ONNX export or the OpenVINO IR of a checkpoint trained on synthetic data says so (it
    said 'unknown': the export kept the checkpoint's sha256, not its provenance); the sidecars record it too."""
    from contextlib import ExitStack

    from export.onnx import load_export_model, load_patches, run_onnx_stage
    from export.openvino import export_openvino
    from export.spec import IOSpec

    model, name = load_export_model(None, str(probe_checkpoint))
    patches, _, source = load_patches(None, 'valid', 8)
    onnx_file = run_onnx_stage(model, tmp_path, model_name=name, checkpoint=str(probe_checkpoint), spec=IOSpec(),
                               opset=18, patches=patches, patch_source=source, tolerance=1e-3, batch_size=8)['onnx']
    ir = export_openvino(model, tmp_path / 'ov', model_name=name, checkpoint=str(probe_checkpoint), precision='fp32',
                         patches=patches, patch_source=source)
    assert json.loads(Path(str(ir['sidecar'])).read_text())['training_data_provenance'] == 'synthetic'
    for artefact, backend in ((onnx_file, 'onnxruntime'), (ir['xml'], 'openvino_fp32')):
        with ExitStack() as stack:
            _, info = _make_runner(stack, None, str(artefact), backend, 8)
        assert (info['data_provenance'], info['model']) == ('synthetic', 'inception_v4_pcam'), artefact
    # options the exported file cannot take were ignored and recorded as used; another --model was recorded as run
    for kwargs, match in (({'model_name': 'inception_resnet_v2_pcam'},
                           r'--model inception_resnet_v2_pcam: .* holds inception_v4_pcam'),
                          ({'use_ema': True}, r'--use-ema: options of a PyTorch checkpoint; .* exported onnx'),
                          ({'model_kwargs': {'depths': [2, 2, 2]}}, r'--model-kwargs: options of a PyTorch')):
        with ExitStack() as stack, pytest.raises(wsi.SlideError, match=match):
            _make_runner(stack, kwargs.get('model_name'), str(onnx_file), 'onnxruntime', 8,
                         use_ema=kwargs.get('use_ema', False), model_kwargs=kwargs.get('model_kwargs'))


def test_model_provenance_is_unknown_unless_the_checkpoint_records_it(tmp_path):
    import timm

    from timm_inception_pcam.checkpoint import save_checkpoint
    from timm_inception_pcam.wsi.run import _checkpoint_provenance

    model = timm.create_model('inception_v4_pcam', num_classes=2, depths=(1, 1, 1))
    for name, extra, expected in (('plain.pth', {}, 'unknown'), ('pcam.pth', {'data_provenance': 'pcam'}, 'pcam'),
                                  ('dict.pth', {'data_provenance': {'provenance': 'synthetic'}}, 'synthetic'),
                                  ('meta.safetensors', {'data_provenance': 'synthetic'}, 'synthetic')):
        path = save_checkpoint(tmp_path / name, model, arch='inception_v4_pcam', model_kwargs={'depths': (1, 1, 1)},
                               **extra)
        assert _checkpoint_provenance(str(path)) == expected, name
    (tmp_path / 'm.onnx').write_bytes(b'x')
    assert _checkpoint_provenance(str(tmp_path / 'm.onnx')) == 'unknown'
    assert _checkpoint_provenance(None) == 'unknown' == _checkpoint_provenance('hf-hub:org/name')


BAD_VALUES = [
    (['--mpp', '1e-9'], '--mpp'), (['--mpp', '1e9'], '--mpp'), (['--target-mpp', '0'], '--target-mpp'),
    (['--stride', '-1'], '--stride'), (['--stride', '0'], '--stride'), (['--stride', '100000'], '--stride'),
    (['--batch-size', '0'], '--batch-size'), (['--batch-size', '1000000'], '--batch-size'),
    (['--threshold', '1.5'], '--threshold'), (['--min-tissue', '-0.1'], '--min-tissue'),
    (['--tissue-threshold', 'nan'], '--tissue-threshold'), (['--thumbnail-size', '1000000000'], '--thumbnail-size'),
    (['--save-every', '-1'], '--save-every'), (['--mpp-tolerance', '-0.5'], '--mpp-tolerance'),
]


@pytest.mark.parametrize('extra,option', BAD_VALUES, ids=[' '.join(a) for a, _ in BAD_VALUES])
def test_out_of_range_values_exit_2_with_one_line(extra, option, synthetic, tmp_path, capsys):
    argv = [str(synthetic['path']), '--model', 'inception_v4_pcam', '--out', str(tmp_path / 'out'), *extra]
    assert errors.cli(main, 'slide', argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'slide: error: {option} must be') and 'Traceback' not in err[0]
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('mpp,match', [(1e-3, 'square read of level'), (1e3, 'upsampling would invent'),
                                       (3.0, 'tile grid would need')])
def test_absurd_grids_are_refused_before_allocating(mpp, match, synthetic, tmp_path, capsys, monkeypatch):
    from timm_inception_pcam.wsi import grid

    if match == 'tile grid would need':  # 3x upsampled: a 9x larger grid, over a limit made small for the test
        monkeypatch.setattr(grid, 'MAX_GRID_BYTES', 1 << 20)
    allocated, real_full = [], np.full
    monkeypatch.setattr(np, 'full', lambda *a, **k: allocated.append(a) or real_full(*a, **k))
    with pytest.raises(wsi.SlideError, match=match):
        wsi.run_slide(synthetic['path'], Recording(), tmp_path / 'run', options(mpp=mpp), progress=False)
    assert allocated == [] and not (tmp_path / 'run').exists()
    argv = [str(synthetic['path']), '--model', 'inception_v4_pcam', '--out', str(tmp_path / 'cli'), '--mpp', str(mpp)]
    assert errors.cli(main, 'slide', argv) == 2  # before any model is loaded
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'synthetic.tif' in err[0] and '--mpp' in err[0]


def test_an_output_path_that_is_a_file_exits_2_with_one_line(synthetic, tmp_path, capsys):
    (tmp_path / 'taken').write_text('a file, not a folder')
    with pytest.raises(errors.OutputError, match='taken: cannot use as the output folder'):
        wsi.run_slide(synthetic['path'], Recording(), tmp_path / 'taken', options(), progress=False)
    with pytest.raises(errors.OutputError, match='cannot use as the output folder'):
        wsi.run_slide(synthetic['path'], Recording(), tmp_path / 'taken' / 'below', options(), progress=False)
    assert (tmp_path / 'taken').read_text() == 'a file, not a folder'


def test_two_runs_into_one_folder_are_refused(synthetic, tmp_path, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    (out / '.lock').write_text(f'{os.getppid()} {socket.gethostname()}\n')  # a live process holds it
    with pytest.raises(errors.OutputError, match='in use by another run'):
        wsi.run_slide(synthetic['path'], Recording(), out, options(), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ['.lock']
    (out / '.lock').write_text('999999999 ' + socket.gethostname())  # its process is gone: taken over
    wsi.run_slide(synthetic['path'], Recording(), out, options(), progress=False)
    assert (out / 'summary.json').is_file() and not (out / '.lock').exists()
    capsys.readouterr()
    wsi.run_slide(synthetic['path'], Recording(), out, options(), progress=False)  # said "pass --resume to continue"
    assert f'slide: {out} holds a finished run: replacing it' in capsys.readouterr().out


@pytest.mark.parametrize('module', ['timm_inception_pcam.slide', 'timm_inception_pcam.wsi'])
def test_module_commands_exit_2_without_traceback(module, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, '-m', module, str(tmp_path / 'missing.svs'), '--out', str(tmp_path / 'o'),
                           '--batch-size', '-3'], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines() == ['slide: error: --batch-size must be >= 1 and <= 8192, got -3']
    proc = subprocess.run([sys.executable, '-m', module, str(tmp_path / 'missing.svs'), '--out', str(tmp_path / 'o')],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f'slide: error: {tmp_path / "missing.svs"}: slide file not found']
    with pytest.raises(wsi.SlideError, match='a folder, expected a slide file'):  # it said "slide file not found"
        wsi.open_slide(tmp_path)


def test_sigterm_saves_progress_and_releases_the_folder(synthetic, probe_checkpoint, tmp_path, capsys):
    """SIGTERM (timeout, SLURM's scancel or preemption) is handled as Ctrl-C: the finished rows are saved for
    --resume and the lock is released (it ended with nothing saved and a stale .lock, exit 143 without a word)."""
    import signal
    import subprocess
    import sys
    import time

    slow = ('import sys, time\n'
            'import timm_inception_pcam.inference as inference\n'
            'real = inference.probabilities\n'
            'inference.probabilities = lambda runner, patches: (time.sleep(0.3), real(runner, patches))[1]\n'
            'from timm_inception_pcam.errors import cli\n'
            'from timm_inception_pcam.wsi.cli import main\n'
            'sys.exit(cli(main, "slide"))\n')
    out = tmp_path / 'run'
    args = [str(synthetic['path']), '--checkpoint', str(probe_checkpoint), '--backend', 'eager', '-b', '4',
            '--out', str(out), '--no-progress']
    proc = subprocess.Popen([sys.executable, '-c', slow, *args, '--save-every', '0'], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    deadline = time.monotonic() + 240
    while not (out / outputs.PROGRESS_NAME).exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, 'no progress saved'
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith('slide: terminated (SIGTERM); nothing half-written')
    assert sorted(p.name for p in out.iterdir()) == [outputs.PROGRESS_NAME]  # no lock, no summary
    main([*args, '--resume'])
    assert 'slide: resuming synthetic.tif at row ' in capsys.readouterr().out  # not from the start
    assert (out / 'summary.json').is_file() and not (out / '.lock').exists()
