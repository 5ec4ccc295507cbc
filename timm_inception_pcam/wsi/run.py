"""The slide loop: read tissue tiles row by row, score them in batches, save progress, write the outputs."""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..constants import LABEL_NAMES, PCAM_NUM_CLASSES
from ..errors import InferenceError, OutputError
from ..storage import atomic_path, claim_output_dir, file_sha256, staged_outputs
from .grid import TileGrid, plan_grid, read_row, tissue_fractions
from .options import SlideOptions
from .outputs import FILES, PROGRESS_NAME, caveat, fmt, write_outputs
from .reader import SlideError, WholeSlide, open_slide

__all__ = ['SUMMARY_FORMAT', 'Predictor', 'run_slide', 'saved_run']

SUMMARY_FORMAT = 'timm-inception-pcam-slide/1'
Predictor = Callable[[np.ndarray], np.ndarray]  # uint8 NHWC patches -> (N, num_classes) float probabilities


# ----------------------------------------------------------------------------------------------- progress


def _slide_identity(slide: WholeSlide) -> dict[str, Any]:
    stat = slide.path.stat()
    quickhash = slide.properties.get('openslide.quickhash-1')
    return {'name': slide.path.name, 'size': stat.st_size, 'quickhash': quickhash,
            'mtime_ns': None if quickhash else stat.st_mtime_ns}


def _fingerprint(slide: WholeSlide, grid: TileGrid, options: SlideOptions, run_info: dict[str, Any]) -> dict[str, Any]:
    """What the probability map depends on: a resume must match it exactly."""
    return {'slide': _slide_identity(slide), 'grid': asdict(grid), 'tissue_threshold': options.tissue_threshold,
            'min_tissue': options.min_tissue,
            'predictor': {k: run_info.get(k) for k in ('model', 'checkpoint_sha256', 'backend', 'use_ema')}}


def _save_progress(path: Path, prob: np.ndarray, tissue: np.ndarray, rows_done: int, fingerprint: dict) -> None:
    with atomic_path(path, suffix='.npz') as tmp:
        with open(tmp, 'wb') as f:
            np.savez(f, probability=prob, tissue=tissue, rows_done=np.int64(rows_done),
                     fingerprint=np.array(json.dumps(fingerprint, sort_keys=True)))


def _differences(found: dict[str, Any], fingerprint: dict[str, Any]) -> list[str]:
    """The keys in which a saved fingerprint (read back from JSON) differs from `fingerprint`."""
    expected = json.loads(json.dumps(fingerprint, sort_keys=True))
    return [k for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k)]


def _load_progress(path: Path, fingerprint: dict) -> tuple[np.ndarray, np.ndarray, int]:
    try:
        with np.load(path, allow_pickle=False) as z:
            found = json.loads(str(z['fingerprint']))
            prob, tissue, rows_done = z['probability'], z['tissue'], int(z['rows_done'])
    except (OSError, ValueError, KeyError) as e:
        raise SlideError(f'{path}: unreadable progress file ({e}); delete it or run without --resume') from e
    if diffs := _differences(found, fingerprint):
        expected = json.loads(json.dumps(fingerprint, sort_keys=True))
        detail = '; '.join(f'{k}: saved {found.get(k)!r}, now {expected.get(k)!r}' for k in diffs)
        raise SlideError(f'{path}: the saved progress was made with other settings ({detail}); run without '
                         f'--resume to start over')
    shape = tuple(fingerprint['grid'][k] for k in ('rows', 'cols'))
    if prob.shape != shape or tissue.shape != shape or not 0 <= rows_done <= shape[0]:
        raise SlideError(f'{path}: progress arrays {prob.shape} / row {rows_done} do not fit the {shape} grid; '
                         f'delete it or run without --resume')
    return prob, tissue, rows_done


def saved_run(slide: WholeSlide, out_dir: str | os.PathLike, options: SlideOptions,
              run_info: dict[str, Any]) -> tuple[dict[str, Any] | None, bool, list[str]]:
    """What an earlier run left in `out_dir` for `slide`, judged by the settings a `--resume` is checked against
    (`_fingerprint`) and the outputs' `threshold`: (its summary when it finished with these settings, to reuse as it
    is, else None; whether its progress file has them, to resume from: when complete, only the outputs are written
    again; the settings a finished run there differs in, e.g. ['predictor', 'threshold'], else [])."""
    out = Path(out_dir)
    grid, _ = plan_grid(slide, options)
    fingerprint = _fingerprint(slide, grid, options, run_info)
    try:
        with np.load(out / PROGRESS_NAME, allow_pickle=False) as z:
            resume = not _differences(json.loads(str(z['fingerprint'])), fingerprint)
    except (OSError, ValueError, KeyError):  # none, or unreadable: start over
        resume = False
    try:
        summary = json.loads((out / FILES['summary']).read_text())
    except (OSError, ValueError):
        return None, resume, []
    if not isinstance(summary, dict):
        return None, resume, []
    saved = summary.get('fingerprint')
    differs = _differences(saved, fingerprint) if isinstance(saved, dict) else ['unrecorded']
    if summary.get('threshold') != options.threshold:
        differs.append('threshold')
    return (None if differs else summary), resume, differs


# ----------------------------------------------------------------------------------------------- inference


def _class1(probs: Any, n: int) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 2 or probs.shape[0] != n or probs.shape[1] != PCAM_NUM_CLASSES:
        raise InferenceError(f'predictor returned shape {tuple(probs.shape)} for {n} patches, expected ({n}, '
                             f'{PCAM_NUM_CLASSES}) probabilities ({", ".join(LABEL_NAMES)})')
    if not np.isfinite(probs).all() or probs.min() < -1e-4 or probs.max() > 1 + 1e-4:
        raise InferenceError('predictor returned values outside [0, 1] or non-finite: expected softmax probabilities')
    return np.clip(probs[:, 1], 0.0, 1.0)


def run_slide(
        slide: WholeSlide | str | os.PathLike,
        predict: Predictor,
        out_dir: str | os.PathLike,
        options: SlideOptions | None = None,
        *,
        resume: bool = False,
        run_info: dict[str, Any] | None = None,
        progress: bool | None = None,
) -> dict[str, Any]:
    """Classify every tissue tile of a slide with `predict` and write the outputs; returns the summary.

    `run_info` (model, checkpoint, checkpoint_sha256, backend, data_provenance, ...) goes into the summary and into
    the fingerprint a resume is checked against.
    """
    options = (options or SlideOptions()).check()
    if not isinstance(slide, WholeSlide):
        opened = open_slide(slide)
        try:
            return run_slide(opened, predict, out_dir, options, resume=resume, run_info=run_info, progress=progress)
        finally:
            opened.close()
    run_info = dict(run_info or {})
    out = Path(out_dir)
    grid, mpp_source = plan_grid(slide, options)  # refuses absurd grids before the maps below are allocated
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f'{out}: cannot use as the output folder ({e.strerror or e}); expected a writable '
                          f'folder') from e
    with claim_output_dir(out, option='--out'):  # one run per folder: two would interleave their progress saves
        return _classify(slide, predict, out, options, grid, mpp_source, resume, run_info, progress)


def _classify(slide: WholeSlide, predict: Predictor, out: Path, options: SlideOptions, grid: TileGrid,
              mpp_source: str, resume: bool, run_info: dict[str, Any], progress: bool | None) -> dict[str, Any]:
    """`run_slide` in its claimed folder: the loop with its progress saves, then the outputs, published together."""
    fingerprint = _fingerprint(slide, grid, options, run_info)
    progress_path = out / PROGRESS_NAME
    prob = np.full((grid.rows, grid.cols), np.nan, dtype=np.float32)
    tissue = np.full((grid.rows, grid.cols), np.nan, dtype=np.float32)
    rows_done = 0
    if resume and progress_path.exists():
        prob, tissue, rows_done = _load_progress(progress_path, fingerprint)
        prob[rows_done:], tissue[rows_done:] = np.nan, np.nan  # rows after the last complete one are redone
        tqdm.write(f'slide: resuming {slide.path.name} at row {rows_done} of {grid.rows}')
    elif (out / FILES['summary']).exists():
        tqdm.write(f'slide: {out} holds a finished run: replacing it (--resume keeps its map)')
    elif progress_path.exists():
        tqdm.write(f'slide: {progress_path} exists: starting over (pass --resume to continue it)')
    start_row = rows_done

    classified = 0
    t0 = time.perf_counter()
    pending: list[tuple[int, int, np.ndarray]] = []  # (row, col, patch) waiting for a batch
    appended = rows_done  # rows whose tissue tiles are all in `pending` or classified

    def flush(limit: int) -> None:
        nonlocal classified
        while len(pending) >= limit and pending:
            batch = pending[:options.batch_size]
            p = _class1(predict(np.stack([t[2] for t in batch])), len(batch))
            rows = np.fromiter((t[0] for t in batch), np.int64, len(batch))
            cols = np.fromiter((t[1] for t in batch), np.int64, len(batch))
            prob[rows, cols] = p
            del pending[:len(batch)]
            classified += len(batch)

    def complete_rows() -> int:
        return min(pending[0][0], appended) if pending else appended

    bar = tqdm(total=grid.rows * grid.cols, initial=rows_done * grid.cols, unit='tile', desc=slide.path.name,
               disable=(not progress) if progress is not None else None, dynamic_ncols=True)
    saved_rows, last_save = rows_done, time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix='slide-read') as pool:
            future: Future | None = pool.submit(read_row, slide, grid, rows_done) if rows_done < grid.rows else None
            for r in range(rows_done, grid.rows):
                strip = future.result()
                future = pool.submit(read_row, slide, grid, r + 1) if r + 1 < grid.rows else None
                frac = tissue_fractions(strip, grid, options.tissue_threshold)
                tissue[r] = frac
                for c in np.flatnonzero(frac >= options.min_tissue):
                    x = int(c) * grid.stride
                    pending.append((r, int(c), strip[:, x:x + grid.tile].copy()))  # no strip outlives its row
                appended = r + 1
                flush(options.batch_size)
                bar.update(grid.cols)
                bar.set_postfix(tissue=classified + len(pending), refresh=False)
                if time.monotonic() - last_save >= options.save_every and r + 1 < grid.rows:
                    flush(1)
                    _save_progress(progress_path, prob, tissue, complete_rows(), fingerprint)
                    saved_rows, last_save = complete_rows(), time.monotonic()
            flush(1)
    except BaseException:
        if complete_rows() > saved_rows:  # keep what is finished, then let the interruption through
            _save_progress(progress_path, prob, tissue, complete_rows(), fingerprint)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    _save_progress(progress_path, prob, tissue, grid.rows, fingerprint)

    summary = {
        'format': SUMMARY_FORMAT,
        'slide': str(slide.path),
        'vendor': slide.vendor,
        'dimensions': list(slide.dimensions),
        'mpp': grid.mpp0,
        'mpp_source': mpp_source,
        'level': grid.level,
        'level_mpp': grid.mpp0 * grid.level_downsample,
        'resample': grid.resample,
        'tile_mpp': grid.tile_mpp,
        'tile_size': grid.tile,
        'stride': grid.stride,
        'grid': [grid.rows, grid.cols],
        **{k: getattr(options, k) for k in ('target_mpp', 'tissue_threshold', 'min_tissue', 'threshold')},
        **run_info,
        'fingerprint': fingerprint,  # what `saved_run` checks before a cohort reuses this run
        'resumed_from_row': start_row if start_row else None,
        'classified_this_run': classified,
        'seconds': round(seconds, 3),
        'tiles_per_second': round(classified / seconds, 3) if classified and seconds > 0 else None,
    }
    # The map, heatmap, tile lists and summary appear together, summary.json last; until then a previous run's
    # complete set stays as it was (a slide with a summary.json is done, for the cohort too).
    with staged_outputs(out, last=FILES['summary']) as staging:
        summary.update(write_outputs(slide, grid, prob, tissue, staging, options, summary))
    tqdm.write(f"slide: {slide.path.name}: {summary['tissue_tiles']} tissue tiles of {grid.rows * grid.cols} at "
               f"{grid.tile_mpp:.3f} um/px (level {grid.level}"
               f"{f', resampled x{grid.resample:.3f}' if grid.resample != 1.0 else ''}), max P(metastatic) "
               f"{fmt(summary['max_probability'])}{caveat(summary)}, {summary['tiles_over_threshold']} tiles >= "
               f"{options.threshold} ({summary['area_over_threshold_mm2']:.4f} mm2), "
               f"{fmt(summary['tiles_per_second'], '.1f')} tiles/s -> {out}")
    return summary


# ----------------------------------------------------------------------------------------------- the model


def _checkpoint_provenance(checkpoint: str | None) -> str:
    """'synthetic' | 'pcam' | 'unknown': the training data a checkpoint file records (an exported file's is read from
    its runner, see `_make_runner`)."""
    from ..data.provenance import provenance_of
    from ..inference.factory import artefact_kind

    if not checkpoint or not Path(checkpoint).is_file() or artefact_kind(checkpoint) != 'checkpoint':
        return 'unknown'
    from ..checkpoint import read_checkpoint

    try:
        return provenance_of(read_checkpoint(checkpoint).get('data_provenance'))
    except Exception:  # an unreadable file fails properly, with its own message, in the loader below
        return 'unknown'


def _make_runner(stack: ExitStack, model_name: str | None, checkpoint: str | None, backend: str = 'auto',
                 batch_size: int = 64, use_ema: bool = False, model_kwargs: dict[str, Any] | None = None,
                 thresholds: tuple[float, ...] = (0.5,)) -> tuple[Predictor, dict[str, Any]]:
    """Tile probabilities for a checkpoint (PyTorch, ONNX, or a TensorRT plan with its sidecar) and its run info.

    The runner comes from `timm_inception_pcam.inference.create_runner` (closed when `stack` closes); `backend` is
    one of its backends ('auto', 'eager', 'bf16', 'onnxruntime', 'tensorrt', ...). Torch models run on the CPU,
    plans on the GPU. `thresholds`: the tile probabilities at which the checked backends (auto on CPUs with AMX or
    AVX-512 BF16) keep float32's decisions. The probability function is ``functools.partial(probabilities, runner)``.
    """
    import functools

    from ..inference import create_runner, probabilities
    from ..inference.factory import artefact_kind

    is_file = bool(checkpoint) and Path(str(checkpoint)).is_file()
    info: dict[str, Any] = {'model': model_name, 'checkpoint': checkpoint, 'backend': backend, 'use_ema': use_ema,
                            'checkpoint_sha256': file_sha256(checkpoint) if is_file else None,
                            'data_provenance': _checkpoint_provenance(checkpoint), 'random_weights': not checkpoint}
    kind = artefact_kind(checkpoint) if checkpoint else 'module'
    if backend == 'tensorrt' and kind != 'tensorrt':
        raise SlideError(f'--backend tensorrt needs --checkpoint ENGINE.plan (built by export.trt, with its '
                         f'.json sidecar), got {checkpoint!r}')
    if kind in ('onnx', 'openvino', 'tensorrt'):
        given = [option for option, value in (('--use-ema', use_ema), ('--model-kwargs', model_kwargs)) if value]
        if given:  # they were ignored, and recorded as if used
            raise SlideError(f'{" and ".join(given)}: options of a PyTorch checkpoint; {checkpoint} is an exported '
                             f'{kind} model, fixed when it was exported')
    target: Any = checkpoint
    if not checkpoint:  # a registered model without weights: for timing the pipeline, never for a diagnosis
        from ..checkpoint import load_model

        target = load_model(model_name, None, **(model_kwargs or {}))
        tqdm.write(f'slide: warning: no --checkpoint: {model_name} has random weights, so its map means nothing '
                   f'(useful only to time the pipeline)', file=sys.stderr)
    runner = create_runner(target, backend, 'auto' if kind == 'tensorrt' else 'cpu', batch_size=batch_size,
                           thresholds=tuple(t for t in thresholds if 0.0 < t < 1.0), model_name=model_name,
                           use_ema=use_ema, model_kwargs=model_kwargs)
    stack.callback(runner.close)
    if len(runner.spec.label_names) != PCAM_NUM_CLASSES:
        raise SlideError(f'{checkpoint}: model has {len(runner.spec.label_names)} classes, expected '
                         f'{PCAM_NUM_CLASSES} ({", ".join(LABEL_NAMES)})')
    recorded = runner.spec.extra.get('model')  # every file's runner records its model
    if model_name and recorded and model_name.split('.')[0] != str(recorded).split('.')[0]:
        raise SlideError(f'--model {model_name}: {checkpoint} holds {recorded}; drop --model or name that one')
    info['model'] = model_name or recorded
    if kind in ('onnx', 'openvino', 'tensorrt'):  # an exported file records its checkpoint's training data
        from ..data.provenance import provenance_of

        info['data_provenance'] = provenance_of(runner.spec.extra.get('training_data_provenance'))
    info['backend'] = runner.spec.backend
    return functools.partial(probabilities, runner), info
