"""Export a PCam classifier to a single-file ONNX model and check it against PyTorch on onnxruntime (CPU).

    python -m export.onnx --model inception_v4_pcam --checkpoint runs/train/best.pth.tar --output runs/export

Writes `<name>.onnx` (opset 18+, dynamic batch, weights inside the file, checked with `onnx.checker` full check and
strict shape inference) and `<name>.onnx.parity.json` (PyTorch vs onnxruntime logits on held-out patches).
By default the graph takes float32 NCHW patches already normalised with PCAM_MEAN / PCAM_STD (the runners do this
on the host, in one shared function); `--bake-preprocessing` puts the normalisation inside the graph instead, so
that clients feed raw uint8 NHWC patches.
"""
import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from timm_inception_pcam.checkpoint import ModelKwargsAction
from timm_inception_pcam.errors import ArgumentParser, DataError, ExportError, UsageError, check_range, cli
from timm_inception_pcam.inference.onnx_runner import OnnxRunner, load_onnx_proto, ort_options, read_onnx_metadata
from timm_inception_pcam.inference.torch_runner import TorchRunner
from timm_inception_pcam.storage import atomic_path, atomic_write_json, check_output_folder, file_sha256

from .spec import INPUT_NAME, ONNX_METADATA_KEY, OUTPUT_NAME, IOSpec, softmax

# OnnxRunner, read_onnx_metadata and ort_options live in timm_inception_pcam.inference.onnx_runner (the runtime
# side); they are imported here for the build stages that check what they built.
__all__ = ['ExportError', 'export_onnx', 'bake_preprocessing', 'check_onnx', 'read_onnx_metadata', 'OnnxRunner',
           'ort_options', 'torch_logits', 'parity_report', 'load_patches', 'load_export_model', 'main']

MIN_OPSET = 18
DEFAULT_TOLERANCE = 1e-4
# float32 sums over a deep network differ between runtimes in proportion to the logits' size
DEFAULT_RTOL = 1e-4
PREPROCESS_PREFIX = 'preprocess_'
DEFAULT_SPEC = IOSpec()


def export_onnx(
        model: torch.nn.Module,
        path: str | Path,
        *,
        spec: IOSpec = DEFAULT_SPEC,
        opset: int = MIN_OPSET,
        metadata: dict[str, Any] | None = None,
) -> Path:
    """Export `model` (float NCHW in, logits out) to one self-contained ONNX file at `path`, checked before rename."""
    if opset < MIN_OPSET:
        raise UsageError(f'opset {opset} is too old: expected {MIN_OPSET} or newer')
    path = Path(path)
    model = model.eval()
    c, h, w = 3, 96, 96
    dummy = torch.randn(2, c, h, w)
    with torch.no_grad():
        program = torch.onnx.export(
            model, (dummy,), None, dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim('batch')},), verbose=False)
    proto = program.model_proto
    _inline_external_data(proto, path)
    _name_nodes(proto.graph)
    if spec.baked_in:
        bake_preprocessing(proto, spec)
    proto.doc_string = 'timm-inception-pcam PCam classifier (logits for ' + ', '.join(spec.label_names) + ')'
    helper.set_model_props(proto, {ONNX_METADATA_KEY: spec.onnx_metadata(**{'precision': 'fp32', **(metadata or {})})})
    with atomic_path(path, suffix='.onnx') as tmp:
        onnx.save_model(proto, tmp, save_as_external_data=False)
        check_onnx(tmp, spec, source=str(path))
    return path


def _inline_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """torch may leave weights as external references: load them so the saved model is one file."""
    if any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer):
        from onnx.external_data_helper import load_external_data_for_model
        load_external_data_for_model(proto, str(path.parent))
        for t in proto.graph.initializer:
            t.data_location = TensorProto.DEFAULT
            del t.external_data[:]


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give every node a unique name (FP16 block lists and TensorRT logs address nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f'{node.op_type}_{i}'
        seen.add(node.name)


def bake_preprocessing(proto: onnx.ModelProto, spec: IOSpec) -> onnx.ModelProto:
    """In place: replace the float NCHW input with uint8 NHWC patches normalised in the graph as x * scale - shift.

    scale = 1 / (255 * std), shift = mean / std: the same arithmetic as `preprocess_patches` on the host.
    The caller records `spec` (baked_in=True) in the metadata.
    """
    graph = proto.graph
    if len(graph.input) != 1 or graph.input[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ExportError(f'cannot bake preprocessing: expected one float input, found '
                          f'{[(i.name, i.type.tensor_type.elem_type) for i in graph.input]}')
    (old_input,) = graph.input
    batch_dim = old_input.type.tensor_type.shape.dim[0]
    batch: str | int = batch_dim.dim_param or batch_dim.dim_value
    c, h, w = (d.dim_value for d in old_input.type.tensor_type.shape.dim[1:])
    normalised = f'{PREPROCESS_PREFIX}normalised'
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old_input.name:
                node.input[i] = normalised
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, c, 1, 1)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, c, 1, 1)
    scale = (np.float32(1.0) / (np.float32(255.0) * std)).astype(np.float32)
    shift = (mean / std).astype(np.float32)
    p = PREPROCESS_PREFIX
    nodes = [
        helper.make_node('Cast', [spec.input_name], [f'{p}float'], name=f'{p}cast', to=TensorProto.FLOAT),
        helper.make_node('Transpose', [f'{p}float'], [f'{p}nchw'], name=f'{p}transpose', perm=[0, 3, 1, 2]),
        helper.make_node('Mul', [f'{p}nchw', f'{p}scale'], [f'{p}scaled'], name=f'{p}mul'),
        helper.make_node('Sub', [f'{p}scaled', f'{p}shift'], [normalised], name=f'{p}sub'),
    ]
    graph.initializer.extend([numpy_helper.from_array(scale, f'{p}scale'), numpy_helper.from_array(shift, f'{p}shift')])
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old_nodes)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(spec.input_name, TensorProto.UINT8, [batch, h, w, c]))
    return proto


def check_onnx(path: str | Path, spec: IOSpec | None = None, source: str | None = None) -> onnx.ModelProto:
    """Full checker, strict shape inference, single file, opset, and the IO contract. Returns the inferred model."""
    path = Path(path)
    source = source or str(path)
    model = load_onnx_proto(path, source)
    external = [t.name for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if external:
        raise ExportError(f'{source}: {len(external)} initializers are stored in external files (e.g. '
                          f'{external[0]!r}); expected a single self-contained file')
    opset = max((o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')), default=0)
    if opset < MIN_OPSET:
        raise ExportError(f'{source}: opset {opset}, expected {MIN_OPSET} or newer')
    try:
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        raise ExportError(f'{source}: ONNX check failed: {e}') from e
    if spec is None:
        spec = read_onnx_metadata(model, source)[0]
    _check_io(inferred.graph.input, spec.input_dict(), 'input', source)
    _check_io(inferred.graph.output, spec.output_dict(), 'output', source)
    return inferred


_DTYPES = {'float32': TensorProto.FLOAT, 'uint8': TensorProto.UINT8, 'float16': TensorProto.FLOAT16}


def _check_io(values: Sequence[onnx.ValueInfoProto], expected: dict[str, Any], kind: str, source: str) -> None:
    if len(values) != 1:
        raise ExportError(f'{source}: expected one graph {kind}, found {[v.name for v in values]}')
    (value,) = values
    tensor = value.type.tensor_type
    dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    found_shape = [-1 if isinstance(d, str) else d for d in dims]
    if value.name != expected['name'] or tensor.elem_type != _DTYPES[expected['dtype']] \
            or found_shape != expected['shape'] or not isinstance(dims[0], str):
        raise ExportError(
            f'{source}: graph {kind} is {value.name!r} {TensorProto.DataType.Name(tensor.elem_type).lower()} {dims}; '
            f'expected {expected["name"]!r} {expected["dtype"]} {expected["shape"]} with a dynamic (named) batch')


def torch_logits(model: torch.nn.Module, patches: np.ndarray, spec: IOSpec = DEFAULT_SPEC,
                 batch_size: int = 64) -> np.ndarray:
    """The PyTorch reference of the parity checks: eager float32 on the CPU with `spec`'s preprocessing."""
    runner = TorchRunner(model, 'eager', batch_size=batch_size, mean=spec.mean, std=spec.std)
    try:
        return runner.logits(patches)
    finally:
        runner.close()


def parity_report(reference: np.ndarray, candidate: np.ndarray, tolerance: float, *, reference_name: str,
                  candidate_name: str, source: str, rtol: float = DEFAULT_RTOL) -> dict[str, Any]:
    """Logit/probability differences, and whether the logits vary enough across inputs for the check to mean much.

    Passes when the largest logit difference is at most `tolerance + rtol * max |reference logit|`.
    """
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    allowed = tolerance + rtol * float(np.abs(reference).max())
    prob_diff = np.abs(softmax(reference.astype(np.float64)) - softmax(candidate.astype(np.float64)))
    logit_std = float(reference.std(axis=0).min())
    return {
        'reference': reference_name, 'candidate': candidate_name, 'inputs': source, 'n': int(len(reference)),
        'max_abs_logit_diff': float(diff.max()), 'mean_abs_logit_diff': float(diff.mean()),
        'max_abs_prob_diff': float(prob_diff.max()), 'tolerance': tolerance, 'rtol': rtol,
        'allowed_abs_logit_diff': allowed,
        'logit_std_across_inputs': logit_std,
        'outputs_vary': bool(logit_std > 100 * tolerance),
        'decision_agreement': float((reference.argmax(1) == candidate.argmax(1)).mean()),
        'passed': bool(diff.max() <= allowed),
    }


def load_patches(data_dir: str | Path | None, split: str, n: int, seed: int = 0,
                 offset: int = 0) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Up to `n` patches (+ labels) from a PCam folder, or seeded random patches (no labels) without one."""
    if data_dir is None:
        rng = np.random.default_rng(seed)
        return rng.integers(0, 256, size=(n, 96, 96, 3), dtype=np.uint8), None, f'random uint8 patches (seed {seed})'
    from timm_inception_pcam.data import PCamDataset
    ds = PCamDataset(data_dir, split)
    count = min(n, len(ds) - offset)
    if count < 1:
        raise DataError(f'{data_dir}: split {split!r} has {len(ds)} patches, none left after offset {offset}')
    patches, labels = ds.read_batch(np.arange(offset, offset + count))
    return patches, labels, f'{data_dir} split {split} [{offset}:{offset + count}]'


def load_export_model(model_name: str | None, checkpoint: str | None, *, use_ema: bool = False,
                      pretrained: bool = False, **model_kwargs: Any) -> tuple[torch.nn.Module, str]:
    """The model in eval mode and its registered name; unknown names and bad checkpoints give clear errors."""
    import timm

    import timm_inception_pcam  # noqa: F401  (registers the models)
    from timm_inception_pcam.checkpoint import load_model
    if model_name is not None and not timm.is_model(model_name):
        known = ', '.join(timm.list_models('*pcam*')) or 'none registered'
        raise UsageError(f'--model: unknown model {model_name!r}; PCam models: {known}')
    if model_name is None and checkpoint is None:
        raise UsageError('give --model, --checkpoint, or both')
    model = load_model(model_name, checkpoint, pretrained=pretrained, use_ema=use_ema, **model_kwargs)
    name = model_name or (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
    return model.eval(), name


def checkpoint_sha256(checkpoint: str | None) -> str | None:
    if checkpoint is None or str(checkpoint).startswith('hf-hub:'):
        return None
    return file_sha256(checkpoint)


def source_record(checkpoint: str | None) -> dict[str, Any]:
    """What every exported artefact records of the checkpoint it came from: its sha256 and the data it was trained
    on ('synthetic' | 'pcam' | 'unknown'), so results of the artefact say what the checkpoint's would."""
    from timm_inception_pcam.checkpoint import read_checkpoint
    from timm_inception_pcam.data.provenance import provenance_of

    provenance = 'unknown'
    if checkpoint is not None and Path(checkpoint).is_file():
        provenance = provenance_of(read_checkpoint(checkpoint).get('data_provenance'))
    return {'checkpoint_sha256': checkpoint_sha256(checkpoint), 'training_data_provenance': provenance}


def run_onnx_stage(
        model: torch.nn.Module,
        output: Path,
        *,
        model_name: str,
        checkpoint: str | None,
        spec: IOSpec,
        opset: int,
        patches: np.ndarray,
        patch_source: str,
        tolerance: float,
        batch_size: int,
        stem: str | None = None,
) -> dict[str, Any]:
    """Export, check, compare with PyTorch, write the parity report; shared by export.onnx and export.trt."""
    stem = stem or model_name
    onnx_path = output / f'{stem}.onnx'
    metadata = {'model': model_name, 'precision': 'fp32', 'checkpoint': str(checkpoint) if checkpoint else None,
                **source_record(checkpoint)}
    print(f'Exporting {model_name} to {onnx_path} (opset {opset}, '
          f'{"uint8 NHWC input, preprocessing baked in" if spec.baked_in else "float32 NCHW normalised input"})')
    export_onnx(model, onnx_path, spec=spec, opset=opset, metadata=metadata)
    reference = torch_logits(model, patches, spec, batch_size)
    candidate = OnnxRunner(onnx_path, batch_size).logits(patches)
    report = parity_report(reference, candidate, tolerance, reference_name='pytorch fp32',
                           candidate_name='onnxruntime cpu fp32', source=patch_source)
    report.update(onnx=onnx_path.name, onnx_sha256=file_sha256(onnx_path), opset=opset, baked_in=spec.baked_in)
    report_path = atomic_write_json(output / f'{stem}.onnx.parity.json', report)
    if not report['outputs_vary']:
        print(f'warning: logits barely vary across the parity inputs (std {report["logit_std_across_inputs"]:.3g}); '
              'the parity check says little about this model', file=sys.stderr)
    if not report['passed']:
        raise ExportError(f'{onnx_path}: onnxruntime differs from PyTorch by {report["max_abs_logit_diff"]:.3g} '
                          f'(logits), above the allowed {report["allowed_abs_logit_diff"]:.3g} '
                          f'(tolerance {tolerance:g} + rtol {report["rtol"]:g} x max |logit|); see {report_path}')
    return {'onnx': onnx_path, 'parity_report': report_path, 'parity': report, 'metadata': metadata}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', default=None, help='registered model name (default: the checkpoint\'s arch)')
    parser.add_argument('--checkpoint', default=None,
                        help='our checkpoint, timm train.py .pth.tar, .safetensors or hf-hub:org/name')
    parser.add_argument('--pretrained', action='store_true', help='load the registered pretrained weights')
    parser.add_argument('--use-ema', action='store_true', help='export the EMA weights of the checkpoint')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ModelKwargsAction, metavar='KEY=VALUE',
                        help='extra create_model arguments, e.g. depths=1,1,1')


def add_artefact_args(parser: argparse.ArgumentParser) -> None:
    """The artefact folder, its file stem and the parity check against PyTorch (ONNX, TensorRT, OpenVINO)."""
    parser.add_argument('--output', default='output/export', help='artefact folder')
    parser.add_argument('--name', default=None, help='file stem of the artefacts (default: the model name)')
    parser.add_argument('--bake-preprocessing', action='store_true',
                        help='graph takes raw uint8 NHWC patches (default: normalised float32 NCHW)')
    parser.add_argument('--opset', type=int, default=MIN_OPSET,
                        help=f'ONNX opset ({MIN_OPSET} to the installed onnx package\'s newest)')
    parser.add_argument('--data-dir', default=None,
                        help='PCam folder for the parity patches (default: seeded random patches)')
    parser.add_argument('--split', default='valid', help='split of --data-dir used for parity checks')
    parser.add_argument('--parity-samples', type=int, default=256, help='patches compared with PyTorch')
    parser.add_argument('--tolerance', type=float, default=DEFAULT_TOLERANCE,
                        help='max abs logit difference from PyTorch, plus 1e-4 x the largest |logit|')
    parser.add_argument('--batch-size', type=int, default=64)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog='python -m export.onnx', description=__doc__.split('\n\n')[0])
    add_model_args(parser)
    add_artefact_args(parser)
    return parser


def check_name(name: str | None, what: str = 'a file stem for the artefacts in --output (no folders)') -> None:
    """--name is one plain file or folder name (no separators, not '.' or '..')."""
    if name is not None and (not name.strip() or Path(name).name != name or name in ('.', '..')):
        raise UsageError(f'--name {name!r}: expected {what}')


def check_artefact_args(args: argparse.Namespace) -> None:
    """Check the values of `add_artefact_args` before anything is loaded or written."""
    check_range('--batch-size', args.batch_size, 1)
    check_range('--parity-samples', args.parity_samples, 1)
    check_range('--tolerance', args.tolerance, 0, low_open=True)
    check_range('--opset', args.opset, MIN_OPSET, onnx.defs.onnx_opset_version())
    check_name(args.name)
    check_output_folder(args.output)


def onnx_stage_from_args(args: argparse.Namespace) -> dict[str, Any]:
    check_artefact_args(args)
    model, name = load_export_model(args.model, args.checkpoint, use_ema=args.use_ema, pretrained=args.pretrained,
                                    **args.model_kwargs)
    patches, _, source = load_patches(args.data_dir, args.split, args.parity_samples)
    return run_onnx_stage(model, Path(args.output), model_name=name, checkpoint=args.checkpoint,
                          spec=IOSpec(baked_in=args.bake_preprocessing), opset=args.opset, patches=patches,
                          patch_source=source, tolerance=args.tolerance, batch_size=args.batch_size, stem=args.name)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Returns {'onnx': Path, 'parity_report': Path, 'parity': dict, 'metadata': dict}."""
    args = build_parser().parse_args(argv)
    result = onnx_stage_from_args(args)
    p = result['parity']
    print(f'Wrote {result["onnx"]}: max |logit diff| {p["max_abs_logit_diff"]:.2e} vs PyTorch over {p["n"]} patches '
          f'(tolerance {p["tolerance"]:g}, logit std {p["logit_std_across_inputs"]:.3g})')
    return result


if __name__ == '__main__':
    sys.exit(cli(main, 'python -m export.onnx'))
