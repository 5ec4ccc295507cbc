"""Whole-slide inference over a cohort of slides: Ray across cores or a cluster, or shards for a batch scheduler.

    python -m timm_inception_pcam.cohort 'slides/*.tif' --checkpoint model_best.pth --out runs/cohort --workers 2
    python -m timm_inception_pcam.cohort cohort.csv --checkpoint ... --out DIR --ray-address auto   # a Ray cluster
    python -m timm_inception_pcam.cohort cohort.csv --checkpoint ... --out DIR --executor local \\
        --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT                                         # a SLURM array
    python -m timm_inception_pcam.cohort --merge --out DIR                                           # join shards

Slides are given as paths, globs, or CSV files with a `path` column (and optionally `slide_id`; relative paths are
read from the CSV's folder). Each slide runs through the single-slide loop (`wsi.run_slide`, the same code as
`python -m timm_inception_pcam.slide`) into `DIR/<slide id>/`. One predictor per worker process, loaded once; slides
are scheduled largest first so that workers stay busy when slide sizes differ. A slide that finished with this run's
settings (model, checkpoint, backend, grid, tissue and probability thresholds) is skipped; one that finished with
others is run again with these (its row names the settings that changed); one with a progress file of these settings
resumes from it; a slide that fails (corrupt, unsupported) is recorded with its error and the others go on.
`DIR/cohort.csv` and `cohort.json` (or `cohort.shard-K-of-N.*` with `--shard`) list every slide, and cohort.json the
run's settings; the exit status is 2 when any slide failed, after all others finished. `--merge` refuses missing
shards (unless `--allow-missing`) and shards run with different settings.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import hashlib
import io
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .constants import MAX_WORKERS
from .errors import ArgumentParser, PCamError, UsageError, check_range, cli
from .storage import atomic_write_bytes, atomic_write_json, check_output_folder, file_sha256

__all__ = ['SlideJob', 'CohortConfig', 'CohortError', 'collect_slides', 'shard_of', 'run_cohort', 'merge_shards',
           'COLUMNS', 'main']

log = logging.getLogger(__name__)
COLUMNS = ('slide_id', 'path', 'status', 'error', 'tissue_tiles', 'tissue_area_mm2', 'max_probability', 'max_x',
           'max_y', 'area_over_threshold_mm2', 'seconds', 'backend', 'data_provenance', 'settings_changed')
TABLE_FORMAT = 'timm-inception-pcam-cohort/1'
DEFAULT_WORKERS = 2  # Ray workers
NOT_SETTINGS = ('batch_size', 'save_every', 'thumbnail_size')  # slide options the table's values do not depend on
RAY_CONNECT_TIMEOUT = 10.0  # seconds to wait for a --ray-address HOST:PORT to accept a connection, and to answer
HTTP2_PREFACE = b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'
HTTP2_EMPTY_SETTINGS = b'\x00\x00\x00\x04\x00\x00\x00\x00\x00'  # length 0, type SETTINGS, no flags, stream 0
HTTP2_SETTINGS = 0x04


class CohortError(PCamError):
    """Some slides of the cohort failed (each is listed with its error in the cohort table)."""


@dataclass(frozen=True)
class SlideJob:
    slide_id: str
    path: str
    size: int = 0


@dataclass(frozen=True)
class CohortConfig:
    """Everything a worker needs to build its predictor and run slides (picklable, sent to Ray workers)."""
    out: str
    model: str | None = None
    checkpoint: str | None = None
    backend: str = 'auto'
    use_ema: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    options: Any = None  # wsi.SlideOptions
    threads: int = 1  # torch threads per worker


def _slide_id(path: Path) -> str:
    name = path.name
    for suffix in ('.ome.tiff', '.ome.tif'):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return path.stem


def collect_slides(inputs: Sequence[str]) -> list[SlideJob]:
    """Slides from paths, globs and CSV files; ids must be unique (they name the output folders)."""
    jobs: list[SlideJob] = []
    for item in inputs:
        if item.lower().endswith('.csv'):
            jobs += _read_cohort_csv(Path(item))
            continue
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches:
            raise UsageError(f'{item}: no slide matches this pattern')
        for m in matches:
            p = Path(m)
            jobs.append(SlideJob(_slide_id(p), str(p), p.stat().st_size if p.is_file() else 0))
    if not jobs:
        raise UsageError('no slides given: expected slide paths, globs or a CSV with a path column')
    seen: dict[str, str] = {}
    for job in jobs:
        if job.slide_id in seen:
            raise UsageError(f'slide id {job.slide_id!r} names two slides ({seen[job.slide_id]} and {job.path}); '
                             f'give unique ids in a CSV slide_id column')
        if not job.slide_id or job.slide_id.startswith('.') or '/' in job.slide_id or '\\' in job.slide_id:
            raise UsageError(f'slide id {job.slide_id!r} of {job.path} cannot name a folder')
        seen[job.slide_id] = job.path
    return jobs


def _read_cohort_csv(path: Path) -> list[SlideJob]:
    if not path.is_file():
        raise UsageError(f'{path}: cohort CSV not found')
    try:
        rows = list(csv.DictReader(path.read_text().splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f'{path}: unreadable cohort CSV ({e})') from None
    if not rows or 'path' not in rows[0]:
        raise UsageError(f'{path}: expected a header with a "path" column (and optionally "slide_id")')
    jobs = []
    for i, row in enumerate(rows, start=2):
        if not row.get('path'):
            raise UsageError(f'{path}: line {i} has no path')
        p = Path(row['path']) if Path(row['path']).is_absolute() else path.parent / row['path']
        jobs.append(SlideJob(row.get('slide_id') or _slide_id(p), str(p), p.stat().st_size if p.is_file() else 0))
    return jobs


def shard_of(slide_id: str, n: int) -> int:
    """The shard (0..n-1) a slide belongs to: a hash of its id, stable across runs, machines and cohort order."""
    return int.from_bytes(hashlib.sha256(slide_id.encode()).digest()[:8], 'big') % n


def parse_shard(text: str) -> tuple[int, int]:
    k, sep, n = text.partition('/')
    try:
        k_i, n_i = int(k), int(n)
    except ValueError:
        raise UsageError(f'--shard {text!r}: expected K/N with integers, e.g. 0/4') from None
    if not sep or n_i < 1 or not 0 <= k_i < n_i:
        raise UsageError(f'--shard {text!r}: expected K/N with 0 <= K < N (SLURM: $SLURM_ARRAY_TASK_ID/'
                         f'$SLURM_ARRAY_TASK_COUNT with an array of 0..N-1)')
    return k_i, n_i


# ------------------------------------------------------------------------------------------------ one slide


def _row(job: SlideJob, status: str, seconds: float, summary: dict[str, Any] | None = None, error: str = '',
         info: dict[str, Any] | None = None, changed: Sequence[str] = ()) -> dict[str, Any]:
    """A cohort table row: from the slide's summary, else (a failed slide) the run's `info`."""
    s = summary or {}
    loc = s.get('max_location') or {}
    return {'slide_id': job.slide_id, 'path': job.path, 'status': status, 'error': error,
            'tissue_tiles': s.get('tissue_tiles'), 'tissue_area_mm2': s.get('tissue_area_mm2'),
            'max_probability': s.get('max_probability'), 'max_x': loc.get('x'), 'max_y': loc.get('y'),
            'area_over_threshold_mm2': s.get('area_over_threshold_mm2'), 'seconds': round(seconds, 3),
            'backend': s.get('backend', (info or {}).get('backend')),
            'data_provenance': s.get('data_provenance', (info or {}).get('data_provenance')),
            'settings_changed': ' '.join(changed)}


def run_one(job: SlideJob, predict: Any, info: dict[str, Any], cfg: CohortConfig) -> dict[str, Any]:
    """Run one slide, resume it, or reuse its outputs when they finished with these settings (`wsi.saved_run`);
    never raises for a slide's own failure: it becomes the row's error. The row's `seconds` is the wall time this
    run spent on the slide (checking it, for a skipped one); `settings_changed` names the settings in which the
    finished outputs it replaced differed."""
    from .wsi import open_slide, run_slide, saved_run

    out = Path(cfg.out) / job.slide_id
    t0 = time.perf_counter()
    try:
        slide = open_slide(job.path)
        try:
            summary, resume, changed = saved_run(slide, out, cfg.options, info)
            if summary is not None:
                return _row(job, 'skipped', time.perf_counter() - t0, summary)
            summary = run_slide(slide, predict, out, cfg.options, resume=resume, run_info=info, progress=False)
        finally:
            slide.close()
    except PCamError as e:
        return _row(job, 'failed', time.perf_counter() - t0, error=' '.join(str(e).split()), info=info)
    except Exception as e:  # noqa: BLE001  one slide's bug must not stop a cohort: recorded with its type
        log.exception('slide %s failed', job.slide_id)
        return _row(job, 'failed', time.perf_counter() - t0, error=f'{type(e).__name__}: {e}', info=info)
    return _row(job, 'done', time.perf_counter() - t0, summary, changed=changed)


class _Worker:
    """A predictor built once, then reused for every slide this process runs."""

    def __init__(self, cfg: CohortConfig) -> None:
        import torch

        from .wsi.run import _make_runner

        torch.set_num_threads(max(1, cfg.threads))
        self.cfg = cfg
        self.stack = ExitStack()
        self.error: PCamError | None = None
        try:
            self.predict, self.info = _make_runner(self.stack, cfg.model, cfg.checkpoint, cfg.backend,
                                                   cfg.options.batch_size, cfg.use_ema, cfg.model_kwargs,
                                                   thresholds=tuple({0.5, cfg.options.threshold}))
        except PCamError as e:  # a bad --checkpoint / --backend: `ready` hands it over (Ray would show a traceback)
            self.stack.close()
            self.error = e

    def ready(self) -> PCamError | None:
        """The user error that kept the predictor from loading, for the caller to raise; None when it loaded."""
        return self.error

    def run(self, job: SlideJob) -> dict[str, Any]:
        return run_one(job, self.predict, self.info, self.cfg)


# ------------------------------------------------------------------------------------------------ the cohort


def run_cohort(jobs: Sequence[SlideJob], cfg: CohortConfig, *, executor: str = 'ray', workers: int = DEFAULT_WORKERS,
               ray_address: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Run every job; rows in the order of `jobs`. Largest slides are started first. Nothing is written before the
    predictor loaded (a bad checkpoint or backend raises its PCamError)."""
    from tqdm import tqdm

    order = sorted(jobs, key=lambda j: (-j.size, j.slide_id))
    rows: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        if executor == 'local':
            worker = _Worker(cfg)
            stack.callback(worker.stack.close)
            if error := worker.ready():
                raise error
            results: Iterable[dict[str, Any]] = map(worker.run, order)
        else:
            results = stack.enter_context(_ray_rows(order, cfg, workers, ray_address))
        bar = stack.enter_context(tqdm(total=len(order), unit='slide', desc='cohort', disable=not progress))
        for row in results:
            rows[row['slide_id']] = row
            _advance(bar, rows)
    return [rows[j.slide_id] for j in jobs]


def _advance(bar: Any, rows: dict[str, dict[str, Any]]) -> None:
    bar.update(1)
    bar.set_postfix(tiles=sum(r['tissue_tiles'] or 0 for r in rows.values()),
                    failed=sum(r['status'] == 'failed' for r in rows.values()), refresh=False)


def _ray_endpoint(address: str | None) -> tuple[str, int] | None:
    """(host, port) of a HOST:PORT or ray://HOST:PORT address, None for none / auto / local; else UsageError."""
    if address is None or address in ('auto', 'local'):
        return None
    host, _, port = address.removeprefix('ray://').rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in '/ '):
        raise UsageError(f'--ray-address {address!r}: expected auto, local, HOST:PORT or ray://HOST:PORT of a running '
                         'Ray cluster (e.g. 10.0.0.1:6379)')
    return host, int(port)


def check_ray_address(address: str | None) -> None:
    """UsageError unless `address` is None, auto, local, HOST:PORT or ray://HOST:PORT."""
    _ray_endpoint(address)


def _check_ray_reachable(address: str, timeout: float = RAY_CONNECT_TIMEOUT) -> None:
    """UsageError unless a gRPC server (a Ray head node's GCS, or its Ray Client server) answers at a HOST:PORT
    address: Ray itself retries a dead address for minutes, and hangs on a server of another protocol.

    The probe is HTTP/2's: the client's connection preface and an empty SETTINGS frame, to which every HTTP/2 server
    (gRPC's included) answers with a SETTINGS frame of its own."""
    endpoint = _ray_endpoint(address)
    if endpoint is None:
        return
    host, port = endpoint
    fix = 'expected a running head node (`ray start --head` there), or leave --ray-address out to start Ray here'
    try:
        with socket.create_connection((host.strip('[]'), port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(HTTP2_PREFACE + HTTP2_EMPTY_SETTINGS)
            head = b''
            while len(head) < 9 and (chunk := sock.recv(9 - len(head))):
                head += chunk
    except TimeoutError:
        head = b''
    except OSError as e:
        raise UsageError(f'--ray-address {address}: no Ray cluster answers at {host}:{port} '
                         f'({e.strerror or e or "timed out"}); {fix}') from None
    if len(head) < 9 or head[3] != HTTP2_SETTINGS:
        raise UsageError(f'--ray-address {address}: something listens at {host}:{port} but does not speak gRPC, as a '
                         f'Ray head node does (wrong port?); {fix}')


@contextlib.contextmanager
def _ray_rows(order: Sequence[SlideJob], cfg: CohortConfig, workers: int,
              address: str | None) -> Iterator[Iterable[dict[str, Any]]]:
    """The rows of `order` as Ray workers finish them, once every worker has loaded its predictor."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as e:
        raise UsageError(f"Ray is not installed ({e}): pip install 'timm-inception-pcam[cohort]', or run with "
                         f'--executor local') from None
    started = not ray.is_initialized()
    if started:
        if address:
            _check_ray_reachable(address)
        kwargs: dict[str, Any] = {'address': address} if address else {'num_cpus': workers * cfg.threads}
        try:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
        except ConnectionError as e:  # answered the probe, then was no Ray cluster after all
            reason = ' '.join(str(e).split())[:200]
            raise UsageError(f'--ray-address {address}: Ray could not connect ({reason}); expected a running head '
                             f'node, or leave --ray-address out to start Ray here') from None
    try:
        # A worker that dies mid-slide is restarted and the slide retried: it resumes from its progress file.
        actor = ray.remote(num_cpus=cfg.threads, max_restarts=2, max_task_retries=2)(_Worker)
        actors = [actor.remote(cfg) for _ in range(min(workers, len(order)))]
        for error in ray.get([a.ready.remote() for a in actors]):
            if error is not None:
                raise error
        yield ActorPool(actors).map_unordered(lambda a, job: a.run.remote(job), list(order))
    finally:
        if started:
            ray.shutdown()


def table_name(shard: tuple[int, int] | None) -> str:
    return 'cohort' if shard is None else f'cohort.shard-{shard[0]}-of-{shard[1]}'


def write_table(out: Path, rows: Sequence[dict[str, Any]], name: str, meta: dict[str, Any]) -> tuple[Path, Path]:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator='\n')
    writer.writeheader()
    writer.writerows({k: ('' if r.get(k) is None else r[k]) for k in COLUMNS} for r in rows)
    csv_path = atomic_write_bytes(out / f'{name}.csv', buf.getvalue().encode())
    counts = {s: sum(r['status'] == s for r in rows) for s in ('done', 'skipped', 'failed')}
    json_path = atomic_write_json(out / f'{name}.json', {'format': TABLE_FORMAT, **meta, 'counts': counts,
                                                        'slides': list(rows)})
    return csv_path, json_path


def run_settings(cfg: CohortConfig) -> dict[str, Any]:
    """What the table's values depend on, recorded in cohort.json; shards must agree on it to be merged."""
    checkpoint = cfg.checkpoint
    sha256 = file_sha256(checkpoint) if checkpoint and Path(checkpoint).is_file() else None
    options = {k: v for k, v in asdict(cfg.options).items() if k not in NOT_SETTINGS}
    return {'model': cfg.model, 'checkpoint': checkpoint, 'checkpoint_sha256': sha256, 'backend': cfg.backend,
            'use_ema': cfg.use_ema, 'model_kwargs': cfg.model_kwargs, **options}


def _settings_conflict(settings: dict[int, dict[str, Any]]) -> str:
    """'' when every shard's settings agree, else which differ in which shards (a checkpoint's path and --model only
    count without its sha256: the same file may sit at another path on another node)."""
    parts = []
    for key in sorted({k for s in settings.values() for k in s}):
        if key in ('checkpoint', 'model') and all(s.get('checkpoint_sha256') for s in settings.values()):
            continue  # the file decides: --model given on one node and not another names the same model
        shards_of: dict[str, list[int]] = {}
        for k, s in sorted(settings.items()):
            shards_of.setdefault(json.dumps(s.get(key), sort_keys=True), []).append(k)
        if len(shards_of) > 1:
            parts.append(f'{key} ' + ' vs '.join(f'{v} (shard {", ".join(map(str, ks))})'
                                                 for v, ks in shards_of.items()))
    return '; '.join(parts)


def merge_shards(out: Path, *, allow_missing: bool = False) -> list[dict[str, Any]]:
    """Join the shard tables in `out` into `cohort.csv` / `cohort.json`, with their run settings; refuses
    overlapping or mixed shard sets, shards run with different settings, and missing shards unless
    `allow_missing` (then cohort.json names them)."""
    tables = sorted(out.glob('cohort.shard-*-of-*.json'))
    if not tables:
        raise UsageError(f'{out}: no cohort.shard-K-of-N.json tables to merge')
    rows: dict[str, dict[str, Any]] = {}
    counts = set()
    settings: dict[int, dict[str, Any]] = {}
    for path in tables:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f'{path}: unreadable shard table ({e})') from None
        if not isinstance(data, dict) or data.get('format') != TABLE_FORMAT:
            raise UsageError(f'{path}: not a cohort table (format {TABLE_FORMAT!r} expected)')
        if not isinstance(data.get('settings'), dict):
            raise UsageError(f'{path}: records no run settings (written by an older version); run its shard again')
        settings[data['shard'][0]] = data['settings']
        counts.add(data['shard'][1])
        for row in data['slides']:
            if row['slide_id'] in rows:
                raise UsageError(f'{path}: slide {row["slide_id"]!r} is also in another shard table')
            rows[row['slide_id']] = row
    if len(counts) != 1:
        raise UsageError(f'{out}: shard tables of different shard counts {sorted(counts)}; remove the stale ones')
    (n,) = counts
    if conflict := _settings_conflict(settings):
        raise UsageError(f'{out}: the shards were run with different settings ({conflict}); run the odd ones again '
                         f'with the others\' settings')
    missing = sorted(set(range(n)) - set(settings))
    if missing and not allow_missing:
        raise UsageError(f'{out}: shard{"s" if len(missing) > 1 else ""} {", ".join(map(str, missing))} of {n} '
                         f'missing (no cohort.shard-K-of-{n}.json): run {"them" if len(missing) > 1 else "it"}, '
                         f'or pass --allow-missing to merge the {len(settings)} there are')
    merged = [rows[k] for k in sorted(rows)]
    write_table(out, merged, 'cohort', {'shards_merged': len(settings), 'shards_missing': missing,
                                        'settings': settings[min(settings)]})
    if missing:
        log.warning('merged %d of %d shards; missing shards %s (cohort.json names them)', len(settings), n, missing)
    return merged


def build_parser() -> argparse.ArgumentParser:
    from .checkpoint import ModelKwargsAction
    from .inference import BACKENDS
    from .wsi.cli import add_slide_options

    p = ArgumentParser(prog='python -m timm_inception_pcam.cohort', description=__doc__.split('\n')[0],
                       epilog=__doc__.split('\n', 1)[1])
    p.add_argument('slides', nargs='*', metavar='SLIDE_OR_GLOB_OR_CSV')
    p.add_argument('--out', '--output', dest='out', required=True, help='cohort folder (one sub-folder per slide)')
    p.add_argument('--model', default=None)
    p.add_argument('--checkpoint', default=None, help='checkpoint, .onnx or TensorRT .plan (as for the slide command)')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ModelKwargsAction)
    p.add_argument('--use-ema', action='store_true')
    p.add_argument('--backend', default='auto', choices=('auto', *BACKENDS),
                   help='inference backend (as for the slide command)')
    p.add_argument('--executor', choices=('ray', 'local'), default='ray',
                   help='ray: workers in a Ray cluster (started on this machine unless --ray-address); local: this '
                        'process, slide after slide')
    p.add_argument('--ray-address', default=None,
                   help='auto or HOST:PORT of a running Ray cluster (--executor ray)')
    p.add_argument('--workers', type=int, default=None,
                   help=f'Ray worker processes, one predictor each (default: {DEFAULT_WORKERS}; --executor local '
                        'runs one)')
    p.add_argument('--threads', type=int, default=1, help='CPU threads per worker')
    p.add_argument('--shard', default=None, metavar='K/N', help='run only the slides of shard K of N (0 <= K < N)')
    p.add_argument('--merge', action='store_true', help='join the shard tables in --out into cohort.csv/.json')
    p.add_argument('--allow-missing', action='store_true',
                   help='with --merge: join the shard tables there are when some are missing (cohort.json names them)')
    p.add_argument('--no-progress', action='store_true')
    add_slide_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    from .wsi.cli import slide_options_from_args

    args = build_parser().parse_args(argv)
    out = check_output_folder(args.out, '--out')
    if args.merge:
        if args.slides:
            raise UsageError('--merge joins the shard tables in --out; give no slides with it')
        rows = merge_shards(out, allow_missing=args.allow_missing)
    else:
        if args.allow_missing:
            raise UsageError('--allow-missing goes with --merge (joining shard tables)')
        check_range('--workers', args.workers, 1, MAX_WORKERS)
        check_range('--threads', args.threads, 1, os.cpu_count() or 1)
        check_ray_address(args.ray_address)
        if args.executor == 'local' and args.ray_address:
            raise UsageError(f'--ray-address {args.ray_address} needs --executor ray (--executor local runs without '
                             'Ray)')
        if args.executor == 'local' and args.workers not in (None, 1):
            raise UsageError(f'--workers {args.workers} needs --executor ray (--executor local runs one slide after '
                             'another in this process; for more, run --shard K/N tasks side by side)')
        if args.executor == 'ray' and args.ray_address:
            _check_ray_reachable(args.ray_address)
        options = slide_options_from_args(args)
        jobs = collect_slides(args.slides)
        shard = parse_shard(args.shard) if args.shard else None
        if shard is not None:
            jobs = [j for j in jobs if shard_of(j.slide_id, shard[1]) == shard[0]]
        cfg = CohortConfig(out=str(out), model=args.model, checkpoint=args.checkpoint, backend=args.backend,
                           use_ema=args.use_ema, model_kwargs=dict(args.model_kwargs), options=options,
                           threads=args.threads)
        workers = min(1 if args.executor == 'local' else args.workers or DEFAULT_WORKERS, len(jobs))
        settings = run_settings(cfg)
        t0 = time.perf_counter()
        # Nothing is created in --out before the predictor loaded: a bad --checkpoint leaves nothing behind.
        rows = run_cohort(jobs, cfg, executor=args.executor, workers=workers, ray_address=args.ray_address,
                          progress=not args.no_progress) if jobs else []
        meta = {'executor': args.executor, 'workers': workers, 'threads': args.threads,
                'shard': list(shard) if shard else None, 'seconds': round(time.perf_counter() - t0, 3),
                'settings': settings, 'options': asdict(options)}
        csv_path, _ = write_table(out, rows, table_name(shard), meta)
        done = [r for r in rows if r['status'] == 'done']
        changed = sum(bool(r['settings_changed']) for r in done)
        synthetic = any(r['data_provenance'] == 'synthetic' for r in rows)
        print(f'cohort: {len(done)} done'
              f'{f" ({changed} run again: their earlier outputs had other settings)" if changed else ""}, '
              f'{sum(r["status"] == "skipped" for r in rows)} skipped, '
              f'{sum(r["status"] == "failed" for r in rows)} failed of {len(rows)} slides -> {csv_path}'
              f'{" (model trained on synthetic data)" if synthetic else ""}')
    failed = [r['slide_id'] for r in rows if r['status'] == 'failed']
    if failed:
        raise CohortError(f'{len(failed)} of {len(rows)} slides failed ({", ".join(failed[:5])}'
                          f'{", ..." if len(failed) > 5 else ""}); their errors are in {out}/cohort*.csv')
    return rows


if __name__ == '__main__':
    raise SystemExit(cli(main, 'python -m timm_inception_pcam.cohort'))
