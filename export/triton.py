"""A model repository that NVIDIA Triton Inference Server loads as it is.

    python -m export.triton --checkpoint runs/v4/model_best.pth --model-repository runs/v4/triton
    python -m export.triton --checkpoint ... --model-repository DIR --formats onnx,openvino,tensorrt \\
        --plan runs/v4/plans/inception_v4_pcam.sm90.plan --plan runs/v4/plans/inception_v4_pcam.sm89.plan

Every model takes raw patches (`input`: uint8, NHWC, 96x96x3; the normalisation is in the graph) and returns
`probabilities` (float32, one per label, softmax in the graph), so clients send patches as they are read. One folder
per format, `<model>_<format>/` with `config.pbtxt` (platform or backend, max_batch_size, dynamic batching,
instance group), `1/model.*`, `labels.txt` and `sidecar.json`. Each `config.pbtxt` is parsed with the
model-config protobuf that `tritonclient` ships and its inputs/outputs are checked against the model file's. Each
served file runs through our runner against PyTorch (probabilities on `--data-dir`'s valid patches, else seeded
random ones, within 1e-4; the sidecar's `parity`), so no repository is written around a graph serving other numbers.

TensorRT plans are tied to a GPU's compute capability: each `--plan` must have been built by `export.trt` from this
repository's ONNX (`<model>_onnx/1/model.onnx`, so that it too takes uint8 patches and returns probabilities) with its
sidecar beside it; several plans map by capability through `cc_model_filenames`. Without plans, the TensorRT model is
left out and the command that builds them is printed.

Serve: docker run --rm -p8000:8000 -v $PWD/DIR:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\
    tritonserver --model-repository=/models
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from timm_inception_pcam.errors import ArgumentParser, ExportError, OutputExistsError, UsageError, check_range, cli
from timm_inception_pcam.storage import file_sha256, staging_dir

from .onnx import add_model_args, check_name, load_export_model, load_patches, source_record, torch_logits
from .spec import ONNX_METADATA_KEY, IOSpec, softmax

__all__ = ['FORMATS', 'OUTPUT_NAME', 'build_repository', 'model_config', 'validate_model_config', 'main']

FORMATS = ('onnx', 'openvino', 'tensorrt')
OUTPUT_NAME = 'probabilities'
PARITY_SAMPLES, PARITY_TOLERANCE = 32, 1e-4  # seeded random patches; max |probability difference| vs PyTorch
MARKER = '.pcam_triton.json'
_TYPES = {'uint8': 'TYPE_UINT8', 'float32': 'TYPE_FP32'}
_PLATFORM = {'onnx': ('platform', 'onnxruntime_onnx', 'model.onnx', 'KIND_CPU'),
             'openvino': ('backend', 'openvino', 'model.xml', 'KIND_CPU'),
             'tensorrt': ('platform', 'tensorrt_plan', 'model.plan', 'KIND_GPU')}


@dataclass(frozen=True)
class TritonOptions:
    max_batch_size: int = 256
    preferred_batch_sizes: tuple[int, ...] = (64, 256)
    max_queue_delay_us: int = 2000
    instances: int = 1


def model_config(name: str, fmt: str, label_count: int, options: TritonOptions,
                 cc_filenames: dict[str, str] | None = None) -> str:
    """The `config.pbtxt` text of one model folder."""
    key, value, filename, kind = _PLATFORM[fmt]
    preferred = ', '.join(str(b) for b in options.preferred_batch_sizes if b <= options.max_batch_size)
    lines = [
        f'name: "{name}"',
        f'{key}: "{value}"',
        f'max_batch_size: {options.max_batch_size}',
        f'default_model_filename: "{filename}"',
        'input [',
        '  { name: "input" data_type: TYPE_UINT8 format: FORMAT_NHWC dims: [ 96, 96, 3 ] }',
        ']',
        'output [',
        f'  {{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: [ {label_count} ] label_filename: "labels.txt" }}',
        ']',
        'dynamic_batching {',
        f'  preferred_batch_size: [ {preferred} ]' if preferred else '',
        f'  max_queue_delay_microseconds: {options.max_queue_delay_us}',
        '}',
        f'instance_group [ {{ kind: {kind} count: {options.instances} }} ]',
    ]
    if cc_filenames:
        lines += [f'cc_model_filenames {{ key: "{cc}" value: "{fn}" }}' for cc, fn in sorted(cc_filenames.items())]
    return '\n'.join(line for line in lines if line) + '\n'


def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise ExportError(f"tritonclient is not installed ({e}); pip install 'tritonclient[http,grpc]'") from None
    return model_config_pb2


def validate_model_config(text: str, source: str, model_io: dict[str, Any] | None = None) -> Any:
    """Parse `text` with Triton's ModelConfig protobuf; check it against the model file's inputs and outputs.

    `model_io`: {'inputs': {name: (dtype, shape without batch)}, 'outputs': {...}} read from the model file.
    """
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    config = pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise ExportError(f'{source}: not a valid Triton model configuration ({e})') from None
    if config.max_batch_size < 1:
        raise ExportError(f'{source}: max_batch_size is {config.max_batch_size}, expected >= 1 (batched model)')
    if model_io is not None:
        for kind, declared in (('inputs', config.input), ('outputs', config.output)):
            found = {t.name: (pb2.DataType.Name(t.data_type), list(t.dims)) for t in declared}
            expected = {n: (_TYPES[d], list(s)) for n, (d, s) in model_io[kind].items()}
            if found != expected:
                raise ExportError(f'{source}: declared {kind} {found} do not match the model file\'s {expected}')
    return config


def _onnx_io(path: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load_model(str(path), load_external_data=False)
    names = {onnx.TensorProto.UINT8: 'uint8', onnx.TensorProto.FLOAT: 'float32'}

    def io(values: Sequence[Any]) -> dict[str, Any]:
        return {v.name: (names.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
                         [d.dim_value for d in v.type.tensor_type.shape.dim[1:]]) for v in values}

    return {'inputs': io(model.graph.input), 'outputs': io(model.graph.output)}


def _openvino_io(path: Path) -> dict[str, Any]:
    import openvino as ov

    model = ov.Core().read_model(str(path))
    names = {'u8': 'uint8', 'f32': 'float32'}

    def io(ports: Sequence[Any]) -> dict[str, Any]:
        return {p.get_any_name(): (names.get(p.get_element_type().get_type_name(), str(p.get_element_type())),
                                   [d.get_length() for d in list(p.get_partial_shape())[1:]]) for p in ports}

    return {'inputs': io(model.inputs), 'outputs': io(model.outputs)}


def _serving_onnx(model: Any, path: Path, model_name: str, record: dict[str, Any]) -> IOSpec:
    """ONNX of `model` taking uint8 NHWC patches and returning probabilities (softmax appended to the graph)."""
    import onnx
    from onnx import helper

    from .onnx import check_onnx, export_onnx

    spec = IOSpec(baked_in=True)
    tmp = path.with_name('logits.onnx')
    export_onnx(model, tmp, spec=spec, metadata={'model': model_name})
    proto = onnx.load_model(str(tmp))
    tmp.unlink()
    graph = proto.graph
    (logits,) = graph.output
    graph.node.append(helper.make_node('Softmax', [logits.name], [OUTPUT_NAME], name='serving_softmax', axis=-1))
    probs = onnx.ValueInfoProto()
    probs.CopyFrom(logits)
    probs.name = OUTPUT_NAME
    del graph.output[:]
    graph.output.append(probs)
    served = IOSpec(baked_in=True, output_name=OUTPUT_NAME, activation='none')
    helper.set_model_props(proto, {ONNX_METADATA_KEY: served.onnx_metadata(
        model=model_name, precision='fp32', **record)})
    onnx.save_model(proto, str(path))
    check_onnx(path, served)
    return served


def _parity_patches(data_dir: str | None) -> tuple[np.ndarray, str]:
    patches, _, source = load_patches(data_dir, 'valid', PARITY_SAMPLES)
    return patches, source


def _outputs_vary(reference: np.ndarray) -> bool:
    """Whether PyTorch's probabilities vary across the parity patches enough for PARITY_TOLERANCE to mean much."""
    return bool(reference[:, 1].std() > 100 * PARITY_TOLERANCE)


def _served_parity(path: Path, name: str, reference: np.ndarray, patches: np.ndarray, source: str
                   ) -> dict[str, Any]:
    """Probabilities of a served model file (float32, through our runner) against PyTorch's; ExportError beyond
    PARITY_TOLERANCE."""
    from timm_inception_pcam.inference import create_runner, probabilities

    runner = create_runner(path, precision='fp32')
    try:
        served = probabilities(runner, patches)
    finally:
        runner.close()
    diff = float(np.abs(served.astype(np.float64) - reference).max())
    report = {'reference': 'PyTorch eager float32, softmax', 'inputs': source, 'n': int(len(patches)),
              'max_abs_prob_diff': diff, 'tolerance': PARITY_TOLERANCE,
              'decision_agreement': float((served.argmax(1) == reference.argmax(1)).mean()),
              'prob_std_across_inputs': float(reference[:, 1].std()), 'outputs_vary': _outputs_vary(reference)}
    if not diff <= PARITY_TOLERANCE:
        raise ExportError(f'{name}: the served model\'s probabilities differ from PyTorch\'s by {diff:.3g} (allowed '
                          f'{PARITY_TOLERANCE:g}) over {len(patches)} patches; nothing was written')
    return report


def _plan_files(plans: Sequence[Path], label_count: int) -> dict[str, tuple[Path, dict[str, Any]]]:
    """{compute capability: (plan, sidecar data)}, each plan verified against its sidecar."""
    from .sidecar import read_sidecar, verify_plan_file

    by_cc: dict[str, tuple[Path, dict[str, Any]]] = {}
    for plan in plans:
        sidecar = read_sidecar(plan)
        verify_plan_file(plan, sidecar)
        spec = sidecar.spec
        if (not spec.baked_in or spec.output_name != OUTPUT_NAME or spec.activation != 'none'
                or len(spec.label_names) != label_count):
            raise UsageError(f'{plan}: built from another ONNX (input baked_in={spec.baked_in}, output '
                             f'{spec.output_name!r}, activation {spec.activation!r}); build it from the '
                             f'repository\'s <model>_onnx/1/model.onnx so it '
                             f'takes uint8 patches and returns {OUTPUT_NAME}')
        cc = sidecar.gpu['compute_capability']
        if cc in by_cc:
            raise UsageError(f'{plan}: a second plan for compute capability {cc} (first: {by_cc[cc][0]})')
        by_cc[cc] = (plan, sidecar.data)
    return by_cc


def _write_model(root: Path, name: str, fmt: str, spec: IOSpec, options: TritonOptions, sidecar: dict[str, Any],
                 model_io: dict[str, Any], cc_filenames: dict[str, str] | None = None) -> None:
    folder = root / name
    text = model_config(name, fmt, len(spec.label_names), options, cc_filenames)
    validate_model_config(text, str(folder / 'config.pbtxt'), model_io)
    (folder / 'config.pbtxt').write_text(text)
    (folder / 'labels.txt').write_text('\n'.join(spec.label_names) + '\n')
    (folder / 'sidecar.json').write_text(json.dumps(sidecar, indent=2) + '\n')


def build_repository(model: Any, repository: Path, *, model_name: str, checkpoint: str | None,
                     formats: Sequence[str] = ('onnx', 'openvino'), plans: Sequence[Path] = (),
                     options: TritonOptions = TritonOptions(), overwrite: bool = False,
                     parity_patches: tuple[np.ndarray, str] | None = None) -> dict[str, Any]:
    """Write the repository (in a temporary folder renamed into place when complete); returns what was written.

    `parity_patches`: (uint8 NHWC patches, where from) the served files are checked on (default: 32 seeded random
    patches)."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise UsageError(f'--formats {",".join(formats)}: expected a comma-separated subset of {",".join(FORMATS)}')
    if plans and 'tensorrt' not in formats:
        raise UsageError(f'--plan {plans[0]}: a TensorRT plan is served only with tensorrt in --formats (e.g. '
                         f'--formats {",".join([*formats, "tensorrt"])})')
    if set(formats) == {'tensorrt'} and not plans:
        raise UsageError('--formats tensorrt without --plan: nothing to write; build the plan on the GPU machine from '
                         'the serving ONNX (--formats onnx,tensorrt writes it), then pass it with --plan')
    if repository.exists():
        if not (repository / MARKER).is_file():
            raise OutputExistsError(f'{repository}: exists and is not a repository written by export.triton; '
                                    f'choose another --model-repository')
        if not overwrite:
            raise OutputExistsError(f'{repository}: holds a finished repository; pass --overwrite to replace it')
    # The plans and their sidecars are checked before the (minutes-long) export, not found wanting after it.
    by_cc = _plan_files(plans, len(IOSpec().label_names)) if 'tensorrt' in formats and plans else {}
    tmp = staging_dir(repository.parent, repository.name)
    written: dict[str, Any] = {'models': {}, 'skipped': {}}
    try:
        onnx_name = f'{model_name}_onnx'
        onnx_file = tmp / onnx_name / '1' / 'model.onnx'
        onnx_file.parent.mkdir(parents=True)
        record = source_record(checkpoint)
        spec = _serving_onnx(model, onnx_file, model_name, record)
        base = {'format': 'timm-inception-pcam-triton/1', 'model': model_name, 'input': spec.input_dict(),
                'output': spec.output_dict(),
                'preprocessing': spec.preprocessing_dict(), 'label_names': list(spec.label_names), **record}
        patches, source = parity_patches or _parity_patches(None)
        reference = softmax(torch_logits(model, patches))
        if not _outputs_vary(reference):
            print(f'warning: the probabilities barely vary across the parity patches ({source}; std '
                  f'{reference[:, 1].std():.3g}); the served files\' parity check says little about this model',
                  file=sys.stderr)
        if 'onnx' in formats:
            _write_model(tmp, onnx_name, 'onnx', spec, options,
                         {**base, 'sha256': file_sha256(onnx_file),
                          'parity': _served_parity(onnx_file, onnx_name, reference, patches, source)},
                         _onnx_io(onnx_file))
            written['models'][onnx_name] = 'onnx'
        if 'openvino' in formats:
            import openvino as ov

            name = f'{model_name}_openvino'
            xml = tmp / name / '1' / 'model.xml'
            xml.parent.mkdir(parents=True)
            ov.save_model(ov.convert_model(str(onnx_file)), str(xml), compress_to_fp16=False)
            _write_model(tmp, name, 'openvino', spec, options,
                         {**base, 'sha256': {'xml': file_sha256(xml), 'bin': file_sha256(xml.with_suffix('.bin'))},
                          'parity': _served_parity(xml, name, reference, patches, source)},
                         _openvino_io(xml))
            written['models'][name] = 'openvino'
        if 'tensorrt' in formats:
            name = f'{model_name}_tensorrt'
            if by_cc:
                version = tmp / name / '1'
                version.mkdir(parents=True)
                cc_files = {}
                for cc, (plan, _) in by_cc.items():
                    cc_files[cc] = f'model_sm{cc.replace(".", "")}.plan'
                    shutil.copyfile(plan, version / cc_files[cc])
                io = {'inputs': {'input': ('uint8', [96, 96, 3])},
                      'outputs': {OUTPUT_NAME: ('float32', [len(spec.label_names)])}}
                _write_model(tmp, name, 'tensorrt', spec, options,
                             {**base, 'plans': {cc: data for cc, (_, data) in by_cc.items()}}, io, cc_files)
                written['models'][name] = 'tensorrt'
            else:
                build = (f'on the GPU machine run `python -m export.trt --fp16 --from-onnx '
                         f'{repository / onnx_name / "1" / "model.onnx"} --output PLANS`')
                if 'onnx' not in formats:  # that ONNX is not kept: the plan needs it
                    build = f'rerun with --formats onnx,{",".join(formats)} for the serving ONNX, {build}'
                written['skipped'][name] = f'no --plan given: {build}, then rerun with --plan and --overwrite'
        if 'onnx' not in formats:
            shutil.rmtree(tmp / onnx_name)
        (tmp / MARKER).write_text(json.dumps({**written, 'formats': list(formats)}, indent=2) + '\n')
        if repository.exists():
            old = repository.with_name(f'.{repository.name}.old')
            shutil.rmtree(old, ignore_errors=True)
            os.replace(repository, old)
            os.replace(tmp, repository)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, repository)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog='python -m export.triton', description=__doc__.split('\n\n')[0])
    add_model_args(parser)
    parser.add_argument('--model-repository', required=True, type=Path, help='repository folder to write')
    parser.add_argument('--name', default=None,
                        help='model name in the repository: folders NAME_onnx, NAME_openvino, ... (default: the '
                             'model name)')
    parser.add_argument('--formats', default='onnx,openvino', help=f'comma-separated subset of {",".join(FORMATS)}')
    parser.add_argument('--plan', action='append', type=Path, default=[],
                        help='TensorRT plan (with its sidecar) built from the repository ONNX; repeat per GPU type')
    parser.add_argument('--max-batch-size', type=int, default=256)
    parser.add_argument('--instances', type=int, default=1, help='model instances per device')
    parser.add_argument('--overwrite', action='store_true', help='replace a repository written earlier')
    parser.add_argument('--data-dir', default=None,
                        help=f'PCam folder whose valid patches check the served files against PyTorch (default: '
                             f'{PARITY_SAMPLES} seeded random patches)')
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    check_name(args.name, 'a model name for the repository, without folders')
    check_range('--max-batch-size', args.max_batch_size, 1)
    check_range('--instances', args.instances, 1)
    formats = [f.strip() for f in args.formats.split(',') if f.strip()]
    for plan in args.plan:
        if not plan.is_file():
            raise UsageError(f'--plan {plan}: file not found')
    parity = _parity_patches(args.data_dir) if args.data_dir is not None else None
    model, name = load_export_model(args.model, args.checkpoint, use_ema=args.use_ema, pretrained=args.pretrained,
                                    **args.model_kwargs)
    result = build_repository(model, args.model_repository, model_name=args.name or name, checkpoint=args.checkpoint,
                              formats=formats, plans=args.plan,
                              options=TritonOptions(max_batch_size=args.max_batch_size, instances=args.instances),
                              overwrite=args.overwrite, parity_patches=parity)
    for model_dir, fmt in result['models'].items():
        print(f'{args.model_repository / model_dir}: {fmt}')
    for model_dir, why in result['skipped'].items():
        print(f'{model_dir}: left out; {why}')
    return result


if __name__ == '__main__':
    sys.exit(cli(main, 'python -m export.triton'))
