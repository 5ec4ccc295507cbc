"""FP32 -> mixed FP16 ONNX conversion (onnxconverter-common) guided by value ranges seen on calibration patches.

    python -m export.fp16 --onnx runs/export/inception_v4_pcam.onnx --data-dir data/pcam

TensorRT 11 has no FP16 builder flag: precision lives in the graph. Every node becomes FP16 except the ones whose
outputs reach `--data-max` in magnitude on the calibration patches, the ones with a float weight beyond FP16's
range, the in-graph preprocessing and Cast nodes; graph inputs and outputs stay FP32. The FP16 model is then
compared with the FP32 one on held-out patches (onnxruntime CPU) and the figures are written beside it as
`<name>.fp16.parity.json`.

Why onnxconverter-common and not NVIDIA ModelOpt AutoCast: ModelOpt's `[onnx]` extra pins onnx~=1.21,
onnxruntime-gpu~=1.24 (replacing the CPU onnxruntime) and cupy-cuda12x, against this project's onnx 1.23,
onnxruntime 1.31 and CUDA 13; onnxconverter-common is already a dependency. The range-based block list below does
the part of AutoCast that matters for these models.
"""
import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from tqdm import tqdm

from timm_inception_pcam.errors import ArgumentParser, check_range, cli
from timm_inception_pcam.inference.onnx_runner import OnnxRunner, load_onnx_proto, ort_options, read_onnx_metadata
from timm_inception_pcam.preprocess import batch_slices
from timm_inception_pcam.storage import atomic_path, atomic_write_json, file_sha256

from .onnx import PREPROCESS_PREFIX, ExportError, check_onnx, load_patches
from .spec import ONNX_METADATA_KEY, softmax

__all__ = ['FP16_MAX', 'DEFAULT_DATA_MAX', 'TARGETS', 'value_ranges', 'fp32_nodes', 'drop_fp16_round_trips',
           'fp16_emulation', 'convert_fp16', 'fp16_parity', 'run_fp16_stage', 'main']

FP16_MAX = 65504.0
FP16_MIN_POSITIVE = 2.0 ** -24
DEFAULT_DATA_MAX = 4096.0
TARGETS = {'decision_agreement_min': 0.999, 'auc_change_max': 0.001}


def value_ranges(model_path: str | Path, patches: np.ndarray, batch_size: int = 32) -> dict[str, float]:
    """Max |value| (inf when non-finite) of every float tensor produced by a node, over the calibration patches."""
    import onnxruntime as ort
    model = onnx.load_model(str(model_path))
    inferred = onnx.shape_inference.infer_shapes(model)
    float_values = {v.name for v in list(inferred.graph.value_info) + list(inferred.graph.output)
                    if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    produced = [o for node in model.graph.node for o in node.output if o in float_values]
    existing = {o.name for o in model.graph.output}
    for name in produced:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=['CPUExecutionProvider'])
    spec, _ = read_onnx_metadata(model, str(model_path))
    x = spec.prepare(patches, source=str(model_path))
    ranges = dict.fromkeys(produced, 0.0)
    for s in tqdm(list(batch_slices(len(x), batch_size)), desc='calibration', leave=False):
        outputs = session.run(produced, {spec.input_name: x[s]})
        for name, value in zip(produced, outputs):
            peak = float(np.abs(value).max()) if np.all(np.isfinite(value)) else float('inf')
            ranges[name] = max(ranges[name], peak)
    return ranges


def fp32_nodes(model: onnx.ModelProto, ranges: dict[str, float], data_max: float = DEFAULT_DATA_MAX,
               init_max: float = FP16_MAX) -> dict[str, str]:
    """Nodes to keep in FP32 -> the reason.

    A tensor reaching `data_max` keeps its producer and all its consumers in FP32, so that it is never stored as FP16
    (the FP16 round trips the converter leaves between two FP32 nodes are removed after conversion).
    """
    initializers = {t.name: t for t in model.graph.initializer}
    large = {name: peak for name, peak in ranges.items() if peak > data_max}
    keep: dict[str, str] = {}
    for node in model.graph.node:
        if node.name.startswith(PREPROCESS_PREFIX):
            keep[node.name] = 'input preprocessing (uint8 -> normalised float)'
        elif node.op_type == 'Cast':
            keep[node.name] = 'Cast node (target type is fixed)'
        for name in node.input:
            t = initializers.get(name)
            if t is not None and t.data_type == TensorProto.FLOAT:
                w = float(np.abs(numpy_helper.to_array(t)).max(initial=0.0))
                if w > init_max:
                    keep[node.name] = f'weight {name!r} reaches {w:.4g} > {init_max:g}'
            elif name in large:
                keep[node.name] = f'input {name!r} reaches {large[name]:.4g} > {data_max:g} on calibration data'
        for name in node.output:
            if name in large:
                keep[node.name] = f'output {name!r} reaches {large[name]:.4g} > {data_max:g} on calibration data'
    return keep


def _copy(message):
    duplicate = type(message)()
    duplicate.CopyFrom(message)
    return duplicate


def unshare_initializers(model: onnx.ModelProto, fp32: set[str]) -> int:
    """Give FP32-kept nodes their own copy of weights they share with FP16 nodes (the converter would keep one type
    for both and break the graph); returns how many copies were made."""
    initializers = {t.name: t for t in model.graph.initializer}
    users: dict[str, set[bool]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in initializers:
                users.setdefault(name, set()).add(node.name in fp32)
    shared = {name for name, kinds in users.items() if kinds == {True, False}
              and initializers[name].data_type == TensorProto.FLOAT}
    for name in shared:
        copy = _copy(initializers[name])
        copy.name = f'{name}__fp32'
        model.graph.initializer.append(copy)
    for node in model.graph.node:
        if node.name in fp32:
            for i, name in enumerate(node.input):
                if name in shared:
                    node.input[i] = f'{name}__fp32'
    return len(shared)


def drop_fp16_round_trips(graph: onnx.GraphProto) -> int:
    """Bypass Cast(FP16) -> Cast(FP32) pairs (which would round, or overflow, a tensor kept FP32); returns how many."""
    def cast_to(node: onnx.NodeProto) -> int | None:
        return next((a.i for a in node.attribute if a.name == 'to'), None) if node.op_type == 'Cast' else None

    producers = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    for node in graph.node:
        src = producers.get(node.input[0]) if node.input else None
        if cast_to(node) == TensorProto.FLOAT and src is not None and cast_to(src) == TensorProto.FLOAT16 \
                and node.output[0] not in outputs:
            rename[node.output[0]] = src.input[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    while True:  # drop Cast nodes nobody reads any more (the FP32 cast first, then the FP16 one before it)
        nodes = list(graph.node)
        used = {i for n in nodes for i in n.input} | outputs
        dead = [k for k, n in enumerate(nodes) if n.op_type == 'Cast' and not any(o in used for o in n.output)]
        if not dead:
            break
        removed = {o for k in dead for o in nodes[k].output}
        kept = [_copy(n) for k, n in enumerate(nodes) if k not in set(dead)]
        del graph.node[:]
        graph.node.extend(kept)
        kept_info = [_copy(v) for v in graph.value_info if v.name not in removed]
        del graph.value_info[:]
        graph.value_info.extend(kept_info)
    return len(rename)


def convert_fp16(fp32_path: str | Path, fp16_path: str | Path, calibration: np.ndarray, *,
                 data_max: float = DEFAULT_DATA_MAX, batch_size: int = 32) -> dict[str, Any]:
    """Write the mixed-precision model (checked before rename); returns the conversion record."""
    from onnxconverter_common import float16
    fp32_path, fp16_path = Path(fp32_path), Path(fp16_path)
    model = onnx.load_model(str(fp32_path))
    spec, meta = read_onnx_metadata(model, str(fp32_path))
    if meta.get('precision') != 'fp32':
        raise ExportError(f'{fp32_path}: precision is {meta.get("precision")!r}, expected an fp32 model to convert')
    ranges = value_ranges(fp32_path, calibration, batch_size)
    keep = fp32_nodes(model, ranges, data_max)
    unshare_initializers(model, set(keep))
    with warnings.catch_warnings():  # one warning per tiny weight moved to FP16's smallest subnormal
        warnings.filterwarnings('ignore', message='the float32 number', category=UserWarning)
        converted = float16.convert_float_to_float16(
            model, keep_io_types=True, min_positive_val=FP16_MIN_POSITIVE, max_finite_val=FP16_MAX,
            node_block_list=list(keep), op_block_list=[])
    round_trips = drop_fp16_round_trips(converted.graph)
    props = {p.key: p.value for p in converted.metadata_props}
    meta = {**meta, 'precision': 'fp16', 'fp32_source_sha256': file_sha256(fp32_path)}
    onnx.helper.set_model_props(converted, {**props, ONNX_METADATA_KEY: spec.onnx_metadata(**{
        k: v for k, v in meta.items() if k not in spec.to_dict()})})
    with atomic_path(fp16_path, suffix='.onnx') as tmp:
        onnx.save_model(converted, tmp, save_as_external_data=False)
        check_onnx(tmp, spec, source=str(fp16_path))
    finite_peaks = [v for v in ranges.values() if np.isfinite(v)]
    return {
        'tool': 'onnxconverter-common float16.convert_float_to_float16 (keep_io_types=True)',
        'calibration_patches': int(len(calibration)), 'data_max': data_max, 'init_max': FP16_MAX,
        'max_abs_activation': max(finite_peaks, default=0.0),
        'nodes': len(model.graph.node), 'fp32_nodes': keep, 'fp16_round_trips_removed': round_trips,
    }


def fp16_emulation(model: onnx.ModelProto) -> onnx.ModelProto:
    """FP32 copy of a mixed-precision model in which every FP16 tensor is rounded through FP16 (Cast pairs).

    onnxruntime's CPU provider runs FP16 nodes that lack an FP16 kernel in FP32 and keeps the FP32 values between
    them, which hides FP16 rounding and overflow. Explicit Cast(FP16) -> Cast(FP32) pairs are honoured, so this copy
    stores every activation the FP16 graph stores as FP16 with FP16's precision and range, computing in FP32 as
    TensorRT's FP16 kernels accumulate. Weights are the FP16 values (exactly representable in FP32).
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    fp16 = {v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type == TensorProto.FLOAT16}
    graph = model.graph
    initializers = []
    for t in graph.initializer:
        if t.data_type == TensorProto.FLOAT16:
            t = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)
        initializers.append(t)
    nodes = []
    for node in graph.node:
        node = _copy(node)
        for a in node.attribute:
            if node.op_type == 'Cast' and a.name == 'to' and a.i == TensorProto.FLOAT16:
                a.i = TensorProto.FLOAT  # the rounding pair below does the FP16 part
        nodes.append(node)
        for i, name in enumerate(node.output):
            if name in fp16:
                node.output[i] = f'{name}__fp32'
                nodes += [onnx.helper.make_node('Cast', [f'{name}__fp32'], [f'{name}__fp16'],
                                                name=f'{name}__round16', to=TensorProto.FLOAT16),
                          onnx.helper.make_node('Cast', [f'{name}__fp16'], [name], name=f'{name}__back32',
                                                to=TensorProto.FLOAT)]
    emulated = onnx.helper.make_graph(nodes, graph.name, graph.input, graph.output, initializers)
    out = onnx.helper.make_model(emulated, opset_imports=model.opset_import, ir_version=model.ir_version)
    onnx.helper.set_model_props(out, {p.key: p.value for p in model.metadata_props})
    return out


def fp16_parity(fp32_path: str | Path, fp16_path: str | Path, patches: np.ndarray, labels: np.ndarray | None,
                source: str, batch_size: int = 64) -> dict[str, Any]:
    """FP16 vs FP32 on onnxruntime CPU: probability difference, decision agreement, ROC AUC change."""
    from sklearn.metrics import roc_auc_score
    logits32 = OnnxRunner(fp32_path, batch_size).logits(patches)
    emulated = fp16_emulation(onnx.load_model(str(fp16_path)))
    logits16 = OnnxRunner(emulated, batch_size, name=f'{fp16_path} (FP16 emulation)').logits(patches)
    p32, p16 = softmax(logits32.astype(np.float64))[:, 1], softmax(logits16.astype(np.float64))[:, 1]
    agreement = float((logits32.argmax(1) == logits16.argmax(1)).mean())
    report: dict[str, Any] = {
        'reference': 'onnxruntime cpu fp32',
        'candidate': 'onnxruntime cpu, fp16 model with every fp16 tensor rounded to fp16 (fp16_emulation)',
        'inputs': source,
        'n': int(len(patches)), 'max_abs_prob_diff': float(np.abs(p32 - p16).max()),
        'mean_abs_prob_diff': float(np.abs(p32 - p16).mean()),
        'max_abs_logit_diff': float(np.abs(logits32 - logits16).max()),
        'prob_std_across_inputs': float(p32.std()),
        'decision_agreement': agreement, 'auc_fp32': None, 'auc_fp16': None, 'auc_change': None,
        'targets': TARGETS,
    }
    if labels is not None and len(np.unique(labels)) == 2:
        auc32, auc16 = float(roc_auc_score(labels, p32)), float(roc_auc_score(labels, p16))
        report.update(auc_fp32=auc32, auc_fp16=auc16, auc_change=abs(auc16 - auc32))
    report['meets_targets'] = bool(agreement >= TARGETS['decision_agreement_min'] and (
        report['auc_change'] is None or report['auc_change'] <= TARGETS['auc_change_max']))
    return report


def run_fp16_stage(fp32_path: Path, *, data_dir: str | None, calib_split: str, calib_samples: int,
                   parity_split: str, parity_samples: int, data_max: float = DEFAULT_DATA_MAX,
                   batch_size: int = 64, require_targets: bool = False, output: Path | None = None
                   ) -> dict[str, Any]:
    """Convert and compare; writes `<stem>.fp16.onnx` and `<stem>.fp16.parity.json` into `output` (default: the FP32
    model's folder)."""
    stem = fp32_path.name.removesuffix('.onnx')
    output = fp32_path.parent if output is None else output
    output.mkdir(parents=True, exist_ok=True)
    fp16_path = output / f'{stem}.fp16.onnx'
    calibration, _, calib_source = load_patches(data_dir, calib_split, calib_samples, seed=1)
    # Held-out patches: a different split, or (same split / random) a disjoint range or seed.
    offset = calib_samples if data_dir is not None and parity_split == calib_split else 0
    patches, labels, source = load_patches(data_dir, parity_split, parity_samples, seed=2, offset=offset)
    print(f'Converting {fp32_path.name} to FP16 (calibration: {calib_source})')
    conversion = convert_fp16(fp32_path, fp16_path, calibration, data_max=data_max, batch_size=batch_size)
    report = fp16_parity(fp32_path, fp16_path, patches, labels, source, batch_size)
    report.update(fp32_onnx=fp32_path.name, fp16_onnx=fp16_path.name, fp16_onnx_sha256=file_sha256(fp16_path),
                  calibration=calib_source, conversion=conversion,
                  note='onnxruntime CPU computes FP16 nodes in FP32 and keeps FP32 values between them, hiding FP16 '
                       'rounding and overflow; the candidate therefore rounds every FP16 tensor explicitly (weights '
                       'and activations), with FP32 arithmetic as in TensorRT FP16 kernels. TensorRT fuses layers, so '
                       'it rounds less often than this emulation.')
    report_path = atomic_write_json(output / f'{stem}.fp16.parity.json', report)
    auc = 'n/a (no labels)' if report['auc_change'] is None else f'{report["auc_change"]:.2e}'
    print(f'FP16 vs FP32 over {report["n"]} patches: max |prob diff| {report["max_abs_prob_diff"]:.2e}, '
          f'decision agreement {100 * report["decision_agreement"]:.2f} %, AUC change {auc}; '
          f'{len(conversion["fp32_nodes"])} of {conversion["nodes"]} nodes kept FP32')
    if not report['meets_targets']:
        message = (f'{fp16_path}: FP16 misses the targets (decision agreement >= '
                   f'{TARGETS["decision_agreement_min"]:.1%}, AUC change <= {TARGETS["auc_change_max"]}); '
                   f'see {report_path}')
        if require_targets:
            raise ExportError(message)
        print(f'warning: {message}', file=sys.stderr)
    return {'fp16_onnx': fp16_path, 'fp16_parity_report': report_path, 'fp16_parity': report}


def add_fp16_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--calib-split', default='train', help='split of --data-dir used for calibration')
    parser.add_argument('--calib-samples', type=int, default=256, help='calibration patches for the value ranges')
    parser.add_argument('--fp16-parity-split', default='valid', help='held-out split for the FP16 vs FP32 report')
    parser.add_argument('--fp16-parity-samples', type=int, default=1024)
    parser.add_argument('--data-max', type=float, default=DEFAULT_DATA_MAX,
                        help='keep in FP32 the nodes whose outputs exceed this magnitude on calibration data')
    parser.add_argument('--require-fp16-targets', action='store_true',
                        help='fail when FP16 misses the agreement / AUC targets (default: warn)')


def check_fp16_args(args: argparse.Namespace) -> None:
    """Range-check the numbers of `add_fp16_args` before anything is loaded or written."""
    check_range('--calib-samples', args.calib_samples, 1)
    check_range('--fp16-parity-samples', args.fp16_parity_samples, 1)
    check_range('--data-max', args.data_max, 0, FP16_MAX, low_open=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = ArgumentParser(prog='python -m export.fp16', description=__doc__.split('\n\n')[0])
    parser.add_argument('--onnx', required=True, help='FP32 ONNX model written by export.onnx')
    parser.add_argument('--data-dir', default=None, help='PCam folder (default: seeded random patches, no AUC)')
    parser.add_argument('--batch-size', type=int, default=64)
    add_fp16_args(parser)
    args = parser.parse_args(argv)
    check_range('--batch-size', args.batch_size, 1)
    check_fp16_args(args)
    load_onnx_proto(args.onnx, '--onnx ' + str(args.onnx))  # a missing or broken file: one line, before any work
    return run_fp16_stage(Path(args.onnx), data_dir=args.data_dir, calib_split=args.calib_split,
                          calib_samples=args.calib_samples, parity_split=args.fp16_parity_split,
                          parity_samples=args.fp16_parity_samples, data_max=args.data_max,
                          batch_size=args.batch_size, require_targets=args.require_fp16_targets)


if __name__ == '__main__':
    sys.exit(cli(main, 'python -m export.fp16'))
