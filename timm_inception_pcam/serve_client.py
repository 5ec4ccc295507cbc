"""Send PCam patches to a Triton Inference Server (KServe v2 HTTP) and print their probabilities.

    python -m timm_inception_pcam.serve_client --url 127.0.0.1:8000 --model inception_v4_pcam_onnx patches.npy
    python -m timm_inception_pcam.serve_client --url HOST:8000 --model inception_v4_pcam_openvino a.png b.png
    python -m timm_inception_pcam.serve_client --url HOST:8000 --model M --data-dir /data/pcam --split test --limit 64

The models written by `python -m export.triton` take raw uint8 NHWC patches (`input`) and return `probabilities`;
patches are sent in batches of at most `--batch-size` (the repository's max_batch_size is 256).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .constants import LABEL_NAMES
from .errors import ArgumentParser, DataError, InferenceError, UsageError, check_range, cli
from .preprocess import batch_slices, check_patches

__all__ = ['INPUT_NAME', 'OUTPUT_NAME', 'infer_patches', 'read_patch_files', 'main']

INPUT_NAME, OUTPUT_NAME = 'input', 'probabilities'


def infer_patches(url: str, model: str, patches: np.ndarray, batch_size: int = 64, timeout: float = 60.0) -> np.ndarray:
    """float32 (N, labels) probabilities of uint8 (N, 96, 96, 3) `patches` from a running server."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    patches = check_patches(patches, 'patches')
    if '/' in url or not url.strip() or any(c.isspace() for c in url):
        raise UsageError(f'--url {url!r}: expected HOST:PORT, e.g. 127.0.0.1:8000 (no scheme or path: the client '
                         'speaks HTTP itself)')
    try:
        client = httpclient.InferenceServerClient(url=url, connection_timeout=timeout, network_timeout=timeout)
        if not client.is_model_ready(model):
            raise InferenceError(f'{url}: model {model!r} is not ready (is it in the repository the server loaded?)')
        out = []
        for s in batch_slices(len(patches), batch_size):
            batch = np.ascontiguousarray(patches[s])
            request = httpclient.InferInput(INPUT_NAME, list(batch.shape), 'UINT8')
            request.set_data_from_numpy(batch, binary_data=True)
            result = client.infer(model, [request], outputs=[httpclient.InferRequestedOutput(OUTPUT_NAME)])
            out.append(result.as_numpy(OUTPUT_NAME))
    except InferenceServerException as e:
        raise InferenceError(f'{url}: server error for model {model!r}: {e.message()}') from None
    except (ConnectionError, OSError) as e:
        raise InferenceError(f'{url}: cannot reach the server ({e}); is tritonserver running there?') from None
    return np.concatenate(out).astype(np.float32)


def read_patch_files(paths: Sequence[str | Path]) -> np.ndarray:
    """Patches from `.npy` arrays (N, 96, 96, 3) or (96, 96, 3) uint8, and 96x96 RGB image files."""
    from PIL import Image, UnidentifiedImageError

    arrays = []
    for p in map(Path, paths):
        if not p.is_file():
            raise DataError(f'{p}: file not found; expected a .npy of uint8 patches or a 96x96 image')
        try:
            if p.suffix == '.npy':
                data = np.load(p, allow_pickle=False)
            else:
                with Image.open(p) as im:
                    data = np.asarray(im.convert('RGB'))
        except (ValueError, OSError, UnidentifiedImageError) as e:
            raise DataError(f'{p}: not usable as PCam patches ({e})') from None
        try:
            arrays.append(check_patches(data, str(p)))
        except ValueError as e:  # names the file and what was expected
            raise DataError(str(e)) from None
    return np.concatenate(arrays)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog='python -m timm_inception_pcam.serve_client',
                            description=__doc__.split('\n')[0])
    parser.add_argument('files', nargs='*', help='.npy arrays of uint8 patches or 96x96 image files')
    parser.add_argument('--url', default='127.0.0.1:8000', help='Triton HTTP endpoint host:port')
    parser.add_argument('--model', required=True, help='model name in the repository, e.g. inception_v4_pcam_onnx')
    parser.add_argument('--data-dir', default=None, help='read patches from a PCam folder instead of files')
    parser.add_argument('--split', default='test')
    parser.add_argument('--limit', type=int, default=64, help='patches read from --data-dir')
    parser.add_argument('-b', '--batch-size', type=int, default=64)
    return parser


def main(argv: Sequence[str] | None = None) -> np.ndarray:
    args = build_parser().parse_args(argv)
    check_range('--batch-size', args.batch_size, 1, 256)
    check_range('--limit', args.limit, 1)
    if bool(args.files) == bool(args.data_dir):
        raise UsageError('give patch files or --data-dir (one of the two)')
    if args.data_dir:
        from .data import PCamDataset

        ds = PCamDataset(args.data_dir, args.split)
        patches, _ = ds.read_batch(np.arange(min(args.limit, len(ds))))
    else:
        patches = read_patch_files(args.files)
    probs = infer_patches(args.url, args.model, patches, args.batch_size)
    print('index,' + ','.join(LABEL_NAMES[:probs.shape[1]]))
    for i, row in enumerate(probs):
        print(f'{i},' + ','.join(f'{v:.6f}' for v in row))
    return probs


if __name__ == '__main__':
    sys.exit(cli(main, 'python -m timm_inception_pcam.serve_client'))
