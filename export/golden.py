"""Golden files for the export tests and the C++ runtime: a briefly trained tiny model, its ONNX files, patches and
the onnxruntime FP32 outputs every other runtime (Python TensorRT runner, C++ runner) is compared with.

    python -m export.golden --output runs/golden          # model.onnx, model.fp16.onnx, patches.bin, expected.json
    python -m export.golden --static tests/golden/export  # the small committed files (no model): see manifest.json

The tiny model is `inception_v4_pcam` with depths=(1, 1, 1): BatchNorm statistics estimated on synthetic PCam
patches, then the classifier trained for a few dozen steps on the frozen features. Its outputs vary across patches
(a randomly initialised Inception gives near-constant logits, on which parity means nothing).
"""
import sys
from pathlib import Path

import numpy as np

from timm_inception_pcam.errors import ArgumentParser, check_range, cli
from timm_inception_pcam.inference import probabilities
from timm_inception_pcam.preprocess import preprocess_patches
from timm_inception_pcam.storage import atomic_write_bytes, atomic_write_json, file_sha256
from timm_inception_pcam.testing import TINY_KWARGS, TINY_MODEL, train_tiny_model  # the one tiny-model helper

from .onnx import OnnxRunner, load_patches, run_onnx_stage
from .spec import IOSpec, softmax

__all__ = ['TINY_MODEL', 'TINY_KWARGS', 'train_tiny_model', 'write_golden', 'write_static_golden', 'main']

EXPECTED_FORMAT = 'timm-inception-pcam-golden/1'


def write_golden(output: Path, *, n_train: int = 96, n_patches: int = 64, seed: int = 0) -> dict[str, Path]:
    """Synthetic data, tiny model + checkpoint, FP32 and FP16 ONNX, `patches.bin` and `expected.json`."""
    from timm_inception_pcam.checkpoint import save_checkpoint
    from timm_inception_pcam.data import synthesize_pcam

    from .fp16 import run_fp16_stage
    output.mkdir(parents=True, exist_ok=True)
    data_dir = output / 'data'
    synthesize_pcam(data_dir, n_train, seed=seed, n_valid=n_patches + 64, n_test=16)
    train_x, train_y, _ = load_patches(data_dir, 'train', n_train)
    model = train_tiny_model(train_x, train_y, seed=seed)
    checkpoint = save_checkpoint(output / 'model.pth.tar', model, arch=TINY_MODEL, model_kwargs=TINY_KWARGS)
    patches, labels, source = load_patches(data_dir, 'valid', n_patches)
    onnx_stage = run_onnx_stage(model, output, model_name=TINY_MODEL, checkpoint=str(checkpoint), spec=IOSpec(),
                                opset=18, patches=patches, patch_source=source, tolerance=1e-4, batch_size=32,
                                stem='model')
    fp16_stage = run_fp16_stage(onnx_stage['onnx'], data_dir=str(data_dir), calib_split='train', calib_samples=32,
                                parity_split='valid', parity_samples=64, batch_size=32)
    logits32 = OnnxRunner(onnx_stage['onnx']).logits(patches)
    probs16 = probabilities(OnnxRunner(fp16_stage['fp16_onnx']), patches)
    patches_path = atomic_write_bytes(output / 'patches.bin', np.ascontiguousarray(patches).tobytes())
    expected = {
        'format': EXPECTED_FORMAT, 'model': TINY_MODEL, 'model_kwargs': {'depths': list(TINY_KWARGS['depths'])},
        'patches': {'file': patches_path.name, 'shape': list(patches.shape), 'dtype': 'uint8', 'layout': 'NHWC',
                    'source': source, 'sha256': file_sha256(patches_path)},
        'labels': labels.tolist(),
        'onnx': {'fp32': onnx_stage['onnx'].name, 'fp32_sha256': file_sha256(onnx_stage['onnx']),
                 'fp16': fp16_stage['fp16_onnx'].name, 'fp16_sha256': file_sha256(fp16_stage['fp16_onnx'])},
        'reference': 'onnxruntime cpu, fp32 model',
        'logits_fp32': logits32.tolist(), 'probabilities_fp32': softmax(logits32).tolist(),
        'probabilities_fp16_onnxruntime': probs16.tolist(),
        'tolerance': {'fp32_engine_max_abs_prob_diff': 1e-3, 'fp16_engine_max_abs_prob_diff': 2e-2,
                      'fp16_engine_min_decision_agreement': 0.98},
    }
    expected_path = atomic_write_json(output / 'expected.json', expected)
    return {'checkpoint': checkpoint, 'onnx': onnx_stage['onnx'], 'fp16_onnx': fp16_stage['fp16_onnx'],
            'patches': patches_path, 'expected': expected_path, 'data_dir': data_dir}


def write_static_golden(output: Path, n: int = 4, seed: int = 0) -> dict[str, Path]:
    """Small files for the CPU-only tests (Python and C++): patches, their normalised tensor, example sidecars."""
    import tempfile

    from PIL import Image

    from timm_inception_pcam.data import synthesize_pcam

    from .sidecar import DEFAULT_PROFILE, make_sidecar
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        synthesize_pcam(tmp, 8, seed=seed, n_valid=n, n_test=1)
        patches, labels, _ = load_patches(tmp, 'valid', n)
    files: dict[str, Path] = {'patches': atomic_write_bytes(output / f'patches{n}.bin', patches.tobytes())}
    for i, patch in enumerate(patches):
        png = output / f'patch{i}.png'
        Image.fromarray(patch).save(png)  # lossless; small enough not to need an atomic write
        files[f'png{i}'] = png
    x = preprocess_patches(patches)
    files['preprocessed'] = atomic_write_bytes(output / f'preprocessed{n}.f32', x.astype('<f4').tobytes())
    for name, spec, precision in (('sidecar_fp16.json', IOSpec(), 'fp16'),
                                  ('sidecar_baked_fp32.json', IOSpec(baked_in=True), 'fp32')):
        sidecar = make_sidecar(model=TINY_MODEL, tensorrt_version='11.4.0.106',
                               gpu={'name': 'NVIDIA H100 80GB HBM3', 'compute_capability': '9.0'},
                               precision=precision, spec=spec, profile=DEFAULT_PROFILE, checkpoint_sha256=None,
                               onnx_sha256='0' * 64, plan_sha256='f' * 64)
        files[name] = atomic_write_json(output / name, sidecar)
    manifest = {
        'format': 'timm-inception-pcam-static-golden/1', 'generator': 'python -m export.golden --static DIR',
        'patches': {'file': files['patches'].name, 'shape': [n, 96, 96, 3], 'dtype': 'uint8', 'layout': 'NHWC',
                    'labels': labels.tolist(), 'png': [files[f'png{i}'].name for i in range(n)]},
        'preprocessed': {'file': files['preprocessed'].name, 'shape': [n, 3, 96, 96], 'dtype': 'float32 little-endian',
                         'layout': 'NCHW', 'formula': 'x * (1 / (255 * std)) - mean / std, in float32',
                         'mean': list(IOSpec().mean), 'std': list(IOSpec().std)},
        'sidecars': ['sidecar_fp16.json', 'sidecar_baked_fp32.json'],
        'sha256': {p.name: file_sha256(p) for p in files.values()},
    }
    files['manifest'] = atomic_write_json(output / 'manifest.json', manifest)
    return files


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = ArgumentParser(prog='python -m export.golden', description=__doc__.split('\n\n')[0])
    parser.add_argument('--output', type=Path, default=Path('output/golden'), help='folder for the model golden set')
    parser.add_argument('--static', type=Path, default=None, help='write only the small committed files here')
    parser.add_argument('--patches', type=int, default=64, help='patches in patches.bin / expected.json')
    args = parser.parse_args(argv)
    check_range('--patches', args.patches, 1)
    files = write_static_golden(args.static) if args.static else write_golden(args.output, n_patches=args.patches)
    print(f'Wrote {len(files)} golden files: ' + ', '.join(sorted(p.name for p in files.values())))
    return files


if __name__ == '__main__':
    sys.exit(cli(main, 'python -m export.golden'))
