"""PCam data commands.

    python -m timm_inception_pcam.data synth --root DIR --n 4096 --seed 0      # synthetic set, official layout
    python -m timm_inception_pcam.data download --root DIR                     # official files from Zenodo
    python -m timm_inception_pcam.data decompress --root DIR                   # .h5.gz -> .h5 (md5-checked)
    python -m timm_inception_pcam.data convert --data-dir DIR --output OUT --format folder|wds
    python -m timm_inception_pcam.data info --root DIR                         # counts and class balance
"""
import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..constants import MAX_SEED, MAX_WORKERS, SPLITS
from ..errors import ArgumentParser, MissingFileError, UsageError, check_range, cli

__all__ = ['build_parser', 'main']


def _root(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument('--data-dir', '--root', dest='data_dir', required=True, metavar='DIR', help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog='python -m timm_inception_pcam.data', description=__doc__.split('\n')[0],
                            epilog=__doc__.split('\n', 1)[1])
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('synth', help='write a synthetic PCam set in the official file layout')
    _root(p, 'output folder')
    p.add_argument('--n', type=int, default=4096, help='training patches')
    p.add_argument('--n-valid', type=int, default=None, help='validation patches (default n // 8)')
    p.add_argument('--n-test', type=int, default=None, help='test patches (default n // 8)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--gzip', action='store_true', help='write .h5.gz files, as distributed')

    p = sub.add_parser('download', help='fetch the official files (Zenodo record 2546921), md5-verified')
    _root(p, 'destination folder')
    p.add_argument('--splits', nargs='+', default=list(SPLITS), help='splits to fetch (default: all)')
    p.add_argument('--base-url', default=None, help='mirror serving the files by name (default: Zenodo)')
    p.add_argument('--no-decompress', action='store_true', help='keep the .h5.gz files as they are')
    p.add_argument('--keep-gz', action='store_true', help='keep the .h5.gz files after decompressing')
    p.add_argument('--no-meta', action='store_true', help='skip the meta CSV files')

    p = sub.add_parser('decompress', help='decompress .h5.gz files in place, checking gzip CRC and official md5')
    _root(p, 'folder with the .h5.gz files')
    p.add_argument('--no-md5', action='store_true', help='skip the md5 check (e.g. synthetic .h5.gz files)')

    p = sub.add_parser('convert', help="write an ImageFolder tree (PNG) or webdataset shards for timm's train.py")
    _root(p, 'folder with the official .h5 (or .h5.gz) files')
    p.add_argument('--output', '--out', dest='output', required=True, metavar='OUT', help='output folder')
    p.add_argument('--format', choices=('folder', 'wds'), default='folder')
    p.add_argument('--splits', nargs='+', default=list(SPLITS))
    p.add_argument('-j', '--workers', type=int, default=2, help='worker processes')
    p.add_argument('--shard-size', type=int, default=4096, help='patches per webdataset shard')

    p = sub.add_parser('info', help='check the files of every split and print counts and provenance')
    _root(p, 'folder with the official files')
    p.add_argument('--splits', nargs='+', default=list(SPLITS), help='splits to check (default: all)')
    p.add_argument('--verify', action='store_true',
                   help='compute the md5 of unmarked files once, so official files are recorded as PCam')
    return parser


def _check_args(args: argparse.Namespace) -> None:
    for name in ('n', 'n_valid', 'n_test'):
        check_range(f'--{name.replace("_", "-")}', getattr(args, name, None), 1)
    check_range('--workers', getattr(args, 'workers', None), 1, MAX_WORKERS)
    check_range('--seed', getattr(args, 'seed', None), 0, MAX_SEED)
    check_range('--shard-size', getattr(args, 'shard_size', None), 1)
    root = Path(args.data_dir)
    if args.command != 'synth' and args.command != 'download' and not root.is_dir():
        raise MissingFileError(f'{root}: folder not found; expected a folder holding the PCam files')
    if root.exists() and not root.is_dir():
        raise UsageError(f'{root}: not a folder; expected a folder for the PCam files')


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    start = time.perf_counter()
    root = Path(args.data_dir)
    if args.command == 'synth':
        from .synth import synthesize_pcam

        files = synthesize_pcam(root, args.n, seed=args.seed, n_valid=args.n_valid, n_test=args.n_test,
                                gzip=args.gzip)
        print(f'synth: wrote {len(files)} files to {root} (seed {args.seed}) in {time.perf_counter() - start:.1f} s')
    elif args.command == 'download':
        from .download import ZENODO_URL, download_pcam

        files = download_pcam(root, args.splits, base_url=args.base_url or ZENODO_URL,
                              decompress=not args.no_decompress, keep_gz=args.keep_gz, meta=not args.no_meta)
        print(f'download: {len(files)} verified files in {root} in {time.perf_counter() - start:.1f} s')
    elif args.command == 'decompress':
        from .download import GZ_MD5
        from .pcam import ensure_decompressed

        done = []
        for gz in sorted(root.glob('camelyonpatch_level_2_split_*.h5.gz')):
            md5 = None if args.no_md5 else GZ_MD5.get(gz.name)
            done.append(ensure_decompressed(gz.with_suffix(''), md5=md5))
        if not done:
            raise MissingFileError(f'{root}: no camelyonpatch_level_2_split_*.h5.gz file; expected the official '
                                   f'compressed files')
        print(f'decompress: {len(done)} files ready in {root} in {time.perf_counter() - start:.1f} s')
    elif args.command == 'convert':
        from .convert import convert_pcam

        record = convert_pcam(root, args.output, args.format, args.splits, workers=args.workers,
                              shard_size=args.shard_size)
        total = sum(sum(c.values()) for c in record['counts'].values())
        print(f'convert: {total} patches verified in {args.output} ({args.format}; '
              f'{record.get("written_now", 0)} written now) in {time.perf_counter() - start:.1f} s')
    elif args.command == 'info':
        from .files import normalize_split, split_paths
        from .pcam import check_split_files, ensure_decompressed, read_meta_rows
        from .provenance import folder_provenance, verify_official

        splits = tuple(dict.fromkeys(normalize_split(s) for s in args.splits))
        for split in splits:
            paths = split_paths(root, split)
            meta_path = paths['meta']
            paths = {k: ensure_decompressed(paths[k]) for k in ('x', 'y')}
            n, labels = check_split_files(paths['x'], paths['y'])
            if args.verify:
                for path in paths.values():
                    verify_official(path)
            meta = 'no meta CSV'
            if meta_path.is_file():  # optional for training; checked here when present (one row per patch)
                rows = read_meta_rows(meta_path, n)
                agree = sum(r['center_tumor_patch'] == bool(y) for r, y in zip(rows, labels.tolist()))
                meta = (f'meta: {len({r["wsi"] for r in rows})} slides, center_tumor_patch = label for {agree} of '
                        f'{n}')
            print(f'{split}: {n} patches, {int(labels.sum())} metastatic ({labels.mean():.1%}); {meta}')
        prov = folder_provenance(root, splits)
        hint = {'synthetic': ' (written by synth: results on it are not PCam results)',
                'unknown': ' (md5 not verified: run `info --verify` on the official files)'}.get(prov['provenance'], '')
        held = ('a complete PCam layout' if set(splits) == set(SPLITS) else
                f'the {", ".join(splits)} split{"s" if len(splits) > 1 else ""} in the PCam layout')
        print(f'info: {root} holds {held}; provenance: {prov["provenance"]}{hint}')
    return 0


if __name__ == '__main__':
    sys.exit(cli(main, 'python -m timm_inception_pcam.data'))
