"""Export a PCam model to an OpenVINO IR (`.xml` + `.bin`) with its sidecar JSON and a parity report.

    python -m export.openvino --checkpoint runs/v4/model_best.pth --output runs/v4/export --precision bf16
    python -m export.openvino --checkpoint ... --output DIR --precision int8 --data-dir /data/pcam

`fp32` and `bf16` write the same float32 IR; the sidecar records which inference precision to compile it with.
`int8` quantises with NNCF's post-training quantisation, calibrated on a seeded sample of the training split of
`--data-dir` (random patches without one, recorded as such). The conversion goes through the inference layer's
OpenVINO cache, so after an int8 export the CPU `auto` of `create_runner`, the slide and cohort commands runs the
checked int8 cascade for this checkpoint on this machine, calibrated on the same patches. The sidecar
(`<stem>.xml.json`) carries the same preprocessing, labels, versions and sha256s as the TensorRT export's, and the
runner reads it:

    from timm_inception_pcam.inference.openvino_runner import OpenVINORunner
    runner = OpenVINORunner('DIR/inception_v4_pcam.xml', 'bf16')

Files appear together when complete (written in a temporary folder, then renamed into `--output`).
"""
import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from timm_inception_pcam.errors import ArgumentParser, ExportError, UsageError, check_range, cli
from timm_inception_pcam.storage import atomic_write_json, file_sha256, staged_outputs

from .onnx import (
    DEFAULT_TOLERANCE,
    add_artefact_args,
    add_model_args,
    check_artefact_args,
    load_export_model,
    load_patches,
    parity_report,
    source_record,
    torch_logits,
)
from .spec import IOSpec

__all__ = ['FORMAT', 'calibration_sample', 'export_openvino', 'build_parser', 'main']

FORMAT = 'timm-inception-pcam-openvino/1'
PRECISION_CHOICES = {'fp32': 'fp32', 'f32': 'fp32', 'bf16': 'bf16', 'int8': 'int8'}
LOW_PRECISION_AGREEMENT = 0.99  # bf16 / int8 parity: decisions at 0.5 that must agree with float32


def calibration_sample(data_dir: str | Path | None, n: int, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """`n` training patches drawn with `seed` (sorted indices: contiguous reads), and what they were."""
    if data_dir is None:
        patches, _, source = load_patches(None, 'train', n, seed=seed)
        return patches, {'source': source, 'seed': seed, 'n': n}
    from timm_inception_pcam.data import PCamDataset

    ds = PCamDataset(data_dir, 'train')
    take = min(n, len(ds))
    indices = np.sort(np.random.default_rng(seed).choice(len(ds), size=take, replace=False))
    patches, _ = ds.read_batch(indices)
    return patches, {'source': f'{data_dir} split train, {take} of {len(ds)} patches drawn with seed {seed}',
                     'seed': seed, 'n': take, 'provenance': ds.provenance}


def export_openvino(model: Any, output: Path, *, model_name: str, checkpoint: str | None, precision: str,
                    patches: np.ndarray, patch_source: str, calibration: np.ndarray | None = None,
                    calibration_info: dict[str, Any] | None = None, tolerance: float = DEFAULT_TOLERANCE,
                    batch_size: int = 64, stem: str | None = None) -> dict[str, Any]:
    """Convert, save, compare with PyTorch; returns {'xml', 'bin', 'sidecar', 'parity_report', 'parity'}."""
    import openvino as ov

    from timm_inception_pcam.inference.openvino_runner import OpenVINORunner, cached_model, openvino_version

    stem = stem or model_name
    output.mkdir(parents=True, exist_ok=True)
    spec = IOSpec()
    ov_model, _ = cached_model(model, 'int8' if precision == 'int8' else 'fp32', calibration, calibration_info,
                               spec.mean, spec.std)
    record = source_record(checkpoint)
    with staged_outputs(output, last=f'{stem}.xml') as tmp:  # the .xml last: it is the entry
        xml, bin_ = tmp / f'{stem}.xml', tmp / f'{stem}.bin'
        ov.save_model(ov_model, str(xml), compress_to_fp16=False)
        sidecar = {
            'format': FORMAT, 'model': model_name, 'openvino_version': openvino_version(), 'precision': precision,
            'input': spec.input_dict(), 'output': spec.output_dict(), 'preprocessing': spec.preprocessing_dict(),
            'label_names': list(spec.label_names),
            'sha256': {'checkpoint': record['checkpoint_sha256'], 'xml': file_sha256(xml), 'bin': file_sha256(bin_)},
            'training_data_provenance': record['training_data_provenance'],
            'calibration': calibration_info if precision == 'int8' else None,
        }
        atomic_write_json(tmp / f'{stem}.xml.json', sidecar)
        reference = torch_logits(model, patches, spec, batch_size)
        candidate = OpenVINORunner(xml, precision, batch_size=batch_size).logits(patches)
        report = parity_report(reference, candidate, tolerance, reference_name='pytorch fp32',
                               candidate_name=f'openvino cpu {precision}', source=patch_source)
        if precision != 'fp32':  # a low precision cannot meet float32's tolerance: its decisions are what matter
            report.update(passed=report['decision_agreement'] >= LOW_PRECISION_AGREEMENT,
                          criterion=f'decision agreement >= {LOW_PRECISION_AGREEMENT} (low precision; the checked '
                                    f'cascade settles the rest in float32)')
        report.update(xml=xml.name, precision=precision)
        atomic_write_json(tmp / f'{stem}.xml.parity.json', report)
        if not report['passed']:
            raise ExportError(f'{output / xml.name}: OpenVINO {precision} differs from PyTorch (max |logit diff| '
                              f'{report["max_abs_logit_diff"]:.3g}, decision agreement '
                              f'{report["decision_agreement"]:.4f}); nothing was written')
    return {'xml': output / f'{stem}.xml', 'bin': output / f'{stem}.bin', 'sidecar': output / f'{stem}.xml.json',
            'parity_report': output / f'{stem}.xml.parity.json', 'parity': report}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog='python -m export.openvino', description=__doc__.split('\n\n')[0])
    add_model_args(parser)
    add_artefact_args(parser)
    parser.add_argument('--precision', default='fp32', choices=sorted(PRECISION_CHOICES),
                        help='fp32 (default), bf16 (float32 IR compiled in bf16) or int8 (NNCF quantisation)')
    parser.add_argument('--calibration-samples', type=int, default=512, help='int8: training patches to calibrate')
    parser.add_argument('--calibration-seed', type=int, default=0, help='int8: seed of the calibration sample')
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    precision = PRECISION_CHOICES[args.precision]
    check_artefact_args(args)
    check_range('--calibration-samples', args.calibration_samples, 1)
    if args.bake_preprocessing:
        raise UsageError('--bake-preprocessing applies to ONNX; the OpenVINO runner normalises on the host')
    model, name = load_export_model(args.model, args.checkpoint, use_ema=args.use_ema, pretrained=args.pretrained,
                                    **args.model_kwargs)
    patches, _, source = load_patches(args.data_dir, args.split, args.parity_samples)
    calibration, info = (calibration_sample(args.data_dir, args.calibration_samples, args.calibration_seed)
                         if precision == 'int8' else (None, None))
    result = export_openvino(model, Path(args.output), model_name=name, checkpoint=args.checkpoint,
                             precision=precision, patches=patches, patch_source=source, calibration=calibration,
                             calibration_info=info, tolerance=args.tolerance, batch_size=args.batch_size,
                             stem=args.name)
    p = result['parity']
    print(f'Wrote {result["xml"]} ({precision}): max |logit diff| {p["max_abs_logit_diff"]:.2e}, decision '
          f'agreement {p["decision_agreement"]:.4f} vs PyTorch over {p["n"]} patches')
    return result


if __name__ == '__main__':
    sys.exit(cli(main, 'python -m export.openvino'))
