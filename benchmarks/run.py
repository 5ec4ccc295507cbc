"""The whole benchmark in one command: models, CPU inference backends, data readers, training step, GPU.

    python -m benchmarks.run --output benchmarks/results            # full run (`make bench`), under 15 min here
    python -m benchmarks.run --output /tmp/bench --quick            # tiny sizes: checks that everything runs

Writes `<output>/results.json` and `<output>/results.md` (atomically, after every section, so an interrupted run
leaves the sections done so far) with the machine the figures come from. Every figure is a median over repeats of
runs made side by side in this one process, with ratios against the section's baseline. A section that cannot run
here is recorded as skipped with the reason; one that fails is recorded with its error and the exit status is 1.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from timm_inception_pcam import errors
from timm_inception_pcam.errors import ArgumentParser, check_range
from timm_inception_pcam.storage import atomic_write_bytes, atomic_write_json, check_output_folder

from . import backends, cohort, evaluator, family, gpu, models, training
from .common import DEFAULT_CACHE, FULL, QUICK, Sizes, fmt, machine_info, synthetic_split

__all__ = ['SECTIONS', 'RESULTS_FORMAT', 'build_parser', 'main', 'render_markdown']

RESULTS_FORMAT = 'timm-inception-pcam-bench/1'
SECTIONS = ('models', 'backends', 'evaluator', 'data', 'training', 'slide', 'cohort', 'gpu', 'family')
DEFAULT_SECTIONS = SECTIONS[:-1]  # family trains six models: its own command (--sections family)
TITLES = {'models': 'Models at 96 px (CPU)', 'backends': 'CPU inference backends',
          'evaluator': 'The evaluator end to end: eager float32 vs auto',
          'data': 'Data readers', 'training': 'Training step: our trainer vs a bare PyTorch loop',
          'slide': 'Whole-slide inference (tiles/s)', 'cohort': 'A cohort of slides: Ray workers vs slide after slide',
          'family': 'The Inception family, one recipe, one data set',
          'gpu': 'GPU: TensorRT FP16 vs PyTorch fp16 vs onnxruntime CUDA'}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog='python -m benchmarks.run', description=__doc__.split('\n')[0])
    p.add_argument('--output', default='benchmarks/results', help='folder for results.json and results.md')
    p.add_argument('--quick', action='store_true', help='tiny sizes and reduced-depth models (a smoke test)')
    p.add_argument('--sections', nargs='+', default=list(DEFAULT_SECTIONS), choices=SECTIONS, metavar='SECTION',
                   help=f'what to run (default: {", ".join(DEFAULT_SECTIONS)}; family: train and compare the whole '
                        f'Inception family)')
    p.add_argument('--checkpoint', nargs='+', default=[], metavar='PATH',
                   help='trained checkpoints for the backend accuracy comparison, matched to the models by their '
                        'arch (default: models briefly trained here on synthetic patches, kept in --cache-dir)')
    p.add_argument('--data-dir', default=None, help='labelled PCam files for the backend accuracy comparison '
                                                    '(default: a synthetic set generated in a temporary folder)')
    p.add_argument('--cache-dir', default=str(DEFAULT_CACHE), help='where the briefly trained benchmark models are '
                   'kept between runs (\'\' disables the cache)')
    p.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch\'s choice)')
    p.add_argument('--progress', action=argparse.BooleanOptionalAction, default=True, help='tqdm progress bars')
    return p


def _data_section(quick: bool) -> dict[str, Any]:
    try:
        from . import bench_data
    except ImportError as e:
        return {'status': 'skipped', 'reason': f'benchmarks/bench_data.py is not importable ({e})'}
    return bench_data.run(quick=quick)


def _slide_section(quick: bool, cache_dir: Path | None) -> dict[str, Any]:
    from .slide import benchmark_slide

    return benchmark_slide(quick=quick, cache_dir=cache_dir)


def _slide_markdown(section: dict[str, Any], fmt_) -> list[str]:
    lines = [f'Synthetic pyramidal TIFF, {section["tissue_tiles"]} tissue tiles of 96 px, '
             f'batch {section["batch_size"]}; reading, tissue masking, batching and inference timed (writing the '
             f'outputs afterwards not). `{section.get("baseline")}` was `auto` when issue 14 asked for '
             f'{fmt_(section.get("target"))}x its tiles/s.', '',
             '| model | backend | tiles/s | seconds |', '| --- | --- | --- | --- |']
    lines += [f'| {r["model"] or "(no model: reader only)"} | {r["backend"]} | {fmt_(r["tiles_per_second"])} | '
              f'{fmt_(r["seconds"])} |' for r in section['runs']]
    lines += [''] + [f'{name}: `auto` {fmt_(ratio)}x `{section["baseline"]}` in tiles/s (target '
                     f'{fmt_(section["target"])}x).' for name, ratio in section.get('auto_vs_baseline', {}).items()]
    return lines + ['']


def _provenance(args: argparse.Namespace) -> str:
    """What the accuracy figures are measured on: 'synthetic' unless --data-dir holds verified PCam files."""
    if args.data_dir is None:
        return 'synthetic'
    from timm_inception_pcam.data.provenance import folder_provenance

    return folder_provenance(args.data_dir)['provenance']


def _eval_data(args: argparse.Namespace, sizes: Sizes, work: Path):
    if args.data_dir is None:
        return synthetic_split(work / 'synthetic_pcam', sizes.n_fit, sizes.n_eval)
    import numpy as np

    from timm_inception_pcam.data import PCamDataset

    out = {}
    for key, split, n in (('fit', 'train', sizes.n_fit), ('eval', 'test', sizes.n_eval)):
        ds = PCamDataset(args.data_dir, split)
        out[key] = ds.read_batch(np.arange(min(n, len(ds))))
    return out


def _yes_no(flag: bool | None) -> str:
    return 'not recorded' if flag is None else 'yes' if flag else 'no'


def render_markdown(results: dict[str, Any]) -> str:
    m = results['machine']
    threads = f'{m["torch_threads"]} torch threads'
    lines = ['# timm-inception-pcam benchmark', '',
             f'Machine: {m["cpu"]}, {m["cores"]} cores ({threads}, {m["cpu_capability"]}, '
             f'AMX {_yes_no(m["amx"])}, AVX-512 BF16 {_yes_no(m.get("avx512_bf16"))}), '
             f'load average at start {m["load_average_1_5_15"]}; '
             f'torch {m["torch"]}, timm {m["timm"]}, onnxruntime {m["onnxruntime"]}, Python {m["python"]}. '
             f'{m["date"]}. Mode: {"quick (tiny sizes, not figures to quote)" if results["quick"] else "full"}; '
             f'{fmt(results.get("seconds"))} s.', '',
             f'Data: {results.get("data_provenance", "synthetic")}'
             + (' PCam-format patches generated here: accuracy figures compare backends with each other, they are '
                'not PCam results.' if results.get('data_provenance', 'synthetic') != 'pcam' else ' (official PCam '
                'files, md5-verified).'), '']
    renderers: dict[str, Callable[[dict[str, Any], Any], list[str]]] = {
        'models': models.markdown, 'backends': backends.markdown, 'evaluator': evaluator.markdown,
        'training': training.markdown,
        'gpu': gpu.markdown, 'data': _data_markdown, 'slide': _slide_markdown, 'cohort': cohort.markdown,
        'family': family.markdown}
    for name, section in results['sections'].items():
        lines += [f'## {TITLES[name]}', '']
        status = section.get('status') if isinstance(section, dict) else None
        if status == 'error':
            lines += [f'Failed: `{section["error"]}`', '']
        elif status == 'skipped':
            lines += [f'Skipped: {section["reason"]}.', '']
        else:
            lines += renderers[name](section, fmt)
    return '\n'.join(lines).rstrip() + '\n'


def _data_markdown(section: dict[str, Any], fmt_) -> list[str]:
    """bench_data's own table when it provides one, else its figures as rows."""
    if isinstance(section.get('markdown'), str):
        return [section['markdown'].rstrip(), '']
    rows = [(k, v) for k, v in section.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    return ['| figure | value |', '| --- | --- |'] + [f'| {k} | {fmt_(v)} |' for k, v in rows] + ['']


def _write(out: Path, results: dict[str, Any]) -> None:
    atomic_write_json(out / 'results.json', results)
    atomic_write_bytes(out / 'results.md', render_markdown(results).encode())


def _check_args(args: argparse.Namespace) -> None:
    """A one-line user error (PCamError) for options no section could use, before any section runs."""
    from timm_inception_pcam.checkpoint import read_checkpoint
    from timm_inception_pcam.data import PCamDataset

    check_range('--threads', args.threads, 1)
    check_output_folder(args.output)
    for path in args.checkpoint:
        read_checkpoint(path)  # a missing, folder or garbage file is a CheckpointError naming it
    if args.data_dir is not None:
        for split in ('train', 'test'):  # what the backend and family sections read
            PCamDataset(args.data_dir, split)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    _check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results: dict[str, Any] = {'format': RESULTS_FORMAT, 'quick': args.quick, 'machine': machine_info(),
                               'sizes': sizes.as_dict(), 'checkpoint': args.checkpoint, 'sections': {},
                               'section_seconds': {}, 'seconds': None, 'data_provenance': _provenance(args)}
    with tempfile.TemporaryDirectory(prefix='pcam-bench-') as tmp:
        work = Path(tmp)
        runners: dict[str, Callable[[], dict[str, Any]]] = {
            'models': lambda: models.run(sizes, args.progress),
            'backends': lambda: backends.run(sizes, work / 'onnx', _eval_data(args, sizes, work), args.checkpoint,
                                             Path(args.cache_dir) if args.cache_dir and not args.quick else None,
                                             args.progress),
            'evaluator': lambda: evaluator.run(sizes, work / 'evaluator',
                                               Path(args.cache_dir) if args.cache_dir and not args.quick else None,
                                               args.progress),
            'data': lambda: _data_section(args.quick),
            'training': lambda: training.run(sizes, args.progress),
            'slide': lambda: _slide_section(args.quick, Path(args.cache_dir) if args.cache_dir else None),
            'cohort': lambda: cohort.benchmark_cohort(args.quick),
            'family': lambda: family.run(sizes, work / 'family', args.data_dir, args.progress),
            'gpu': lambda: gpu.run(sizes, work / 'gpu', args.progress),
        }
        for name in SECTIONS:
            if name not in args.sections:
                continue
            print(f'[bench] {name} ...', flush=True)
            t0 = time.perf_counter()
            try:
                section = runners[name]()
            except Exception as e:  # record and go on: the other sections still mean something
                traceback.print_exc()
                section = {'status': 'error', 'error': f'{type(e).__name__}: {e}'}
            results['sections'][name] = section
            results['section_seconds'][name] = round(time.perf_counter() - t0, 1)
            results['seconds'] = round(time.perf_counter() - t_start, 1)
            _write(out, results)
            status = section.get('status', 'ok') if isinstance(section, dict) else 'ok'
            print(f'[bench] {name}: {status} in {results["section_seconds"][name]} s', flush=True)
    failed = [n for n, s in results['sections'].items() if isinstance(s, dict) and s.get('status') == 'error']
    headline = _headline(results)
    print(f'benchmark: {len(results["sections"])} sections in {results["seconds"]} s'
          + (f', FAILED: {", ".join(failed)}' if failed else '') + (f'; {headline}' if headline else '')
          + f' -> {out / "results.json"}, {out / "results.md"}')
    results['failed'] = failed
    return results


def _headline(results: dict[str, Any]) -> str:
    section = results['sections'].get('backends') or {}
    for m in section.get('models', []):
        if m['model'] == 'inception_v4_pcam' and m.get('auto_speedup_vs_eager'):
            return (f'{m["model"]} auto={m["auto"]}: {m["auto_speedup_vs_eager"]:.2f}x eager fp32, '
                    f'agreement {m["auto_decision_agreement"]:.4%}')
    return ''


def cli(argv: Sequence[str] | None = None) -> int:
    """The command: 1 when a section failed (its traceback printed, the others still run); a user error is one
    line and 2."""
    return errors.cli(lambda a: 1 if main(a)['failed'] else 0, 'benchmarks.run', argv)


if __name__ == '__main__':
    sys.exit(cli())
