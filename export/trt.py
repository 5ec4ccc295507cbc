"""Build a TensorRT 11 engine (FP16 by default in the graph) from a checkpoint, with its sidecar JSON.

    python -m export.trt --model inception_v4_pcam --checkpoint best.pth.tar --output runs/export --fp16
    python -m export.trt --from-onnx runs/export/inception_v4_pcam.fp16.onnx --output runs/export   # on the GPU box

Stages: ONNX export + PyTorch parity (export.onnx), FP16 conversion + FP16-vs-FP32 report (export.fp16, with
--fp16), then the engine: `<name>[.fp16].plan`, its sidecar `<plan>.json` and a persistent timing cache. Without a
GPU or TensorRT the ONNX artefacts are still written and the command exits with status 3, saying what is missing and
the command that finishes the build on a GPU machine. `--onnx-only` stops after the ONNX artefacts with status 0.

TensorRT 11: networks are strongly typed and there is no FP16 builder flag, so the precision is the ONNX graph's.
Default optimisation profile: batch min 1 / opt 64 / max 256: kernels are tuned for 64 patches per launch
(already enough 96x96 patches to fill a data-centre GPU), 256 bounds activation memory; larger inputs are split
by the runners. Workspace 4 GiB, builder optimisation level 3 (TensorRT's default; 5 searches longest).
"""
import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from timm_inception_pcam.storage import atomic_path, atomic_write_bytes, file_sha256

from .fp16 import add_fp16_args, run_fp16_stage
from .gpu import GpuInfo, probe
from .onnx import ExportError, add_model_args, check_onnx, onnx_stage_from_args, read_onnx_metadata
from .sidecar import Profile, make_sidecar, sidecar_path, write_sidecar
from .spec import IOSpec

__all__ = ['EXIT_NO_GPU', 'build_engine', 'build_from_onnx', 'finish_command', 'main']

EXIT_NO_GPU = 3
DEFAULT_WORKSPACE_GIB = 4.0
DEFAULT_OPT_LEVEL = 3


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError(f"TensorRT is needed to build engines ({e}); install it with pip install -e '.[trt]' "
                          'on a machine with an NVIDIA GPU') from e
    return trt


def build_engine(onnx_path: Path, spec: IOSpec, *, profile: Profile, workspace_bytes: int, opt_level: int,
                 timing_cache: Path, verbose: bool = False) -> bytes:
    """Serialised plan. Call only after `export.gpu.probe()` found a GPU: TensorRT objects can crash without one."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network()
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        for error in errors:
            print(f'TensorRT ONNX parser: {error}', file=sys.stderr)
        raise ExportError(f'{onnx_path}: TensorRT could not parse the model ({len(errors)} errors, logged above)')
    if network.num_inputs != 1 or network.get_input(0).name != spec.input_name:
        names = [network.get_input(i).name for i in range(network.num_inputs)]
        raise ExportError(f'{onnx_path}: network inputs are {names}, expected [{spec.input_name!r}]')
    tensor = network.get_input(0)
    sample_shape = tuple(tensor.shape)[1:]
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.builder_optimization_level = opt_level
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b''
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, False):
        print(f'warning: {timing_cache} was made by another TensorRT version or GPU; starting a new timing cache',
              file=sys.stderr)
        cache = config.create_timing_cache(b'')
        config.set_timing_cache(cache, False)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(spec.input_name, (profile.min, *sample_shape), (profile.opt, *sample_shape),
                          (profile.max, *sample_shape))
    config.add_optimization_profile(opt_profile)
    print(f'Building the TensorRT engine from {onnx_path.name} (profile {profile.as_dict()}, '
          f'opt level {opt_level}); this takes minutes')
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f'{onnx_path}: TensorRT failed to build the engine (see the log above)')
    atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _parser_error(error: Any) -> str:
    try:
        return f'{error.code()}: {error.desc()} (node {error.node()} {error.node_name()!r})'
    except Exception:
        return str(error)


def build_from_onnx(onnx_path: Path, output: Path, gpu: GpuInfo, tensorrt_version: str, *, profile: Profile,
                    workspace_gib: float, opt_level: int, timing_cache: Path | None = None,
                    verbose: bool = False) -> tuple[Path, Path]:
    """Plan + sidecar for a model written by export.onnx / export.fp16. Returns (plan path, sidecar path)."""
    check_onnx(onnx_path)
    spec, meta = read_onnx_metadata(onnx_path)
    plan_path = output / (onnx_path.name.removesuffix('.onnx') + '.plan')
    timing_cache = timing_cache or output / 'timing.cache'
    plan = build_engine(onnx_path, spec, profile=profile, workspace_bytes=int(workspace_gib * 2**30),
                        opt_level=opt_level, timing_cache=timing_cache, verbose=verbose)
    with atomic_path(plan_path, suffix='.plan') as tmp:
        tmp.write_bytes(plan)
        sidecar = make_sidecar(
            model=meta.get('model') or plan_path.stem, tensorrt_version=tensorrt_version, gpu=gpu.as_sidecar(),
            precision=meta.get('precision', 'fp32'), spec=spec, profile=profile,
            checkpoint_sha256=meta.get('checkpoint_sha256'), onnx_sha256=file_sha256(onnx_path),
            plan_sha256=file_sha256(tmp))
        write_sidecar(plan_path, sidecar)
    return plan_path, sidecar_path(plan_path)


def finish_command(onnx_path: Path, args: argparse.Namespace) -> str:
    """The command that completes the build from the ONNX artefact on a machine with a GPU and TensorRT."""
    cmd = ['python', '-m', 'export.trt', '--from-onnx', str(onnx_path), '--output', str(args.output)]
    for flag, value, default in (('--min-batch', args.min_batch, 1), ('--opt-batch', args.opt_batch, 64),
                                 ('--max-batch', args.max_batch, 256),
                                 ('--workspace-gib', args.workspace_gib, DEFAULT_WORKSPACE_GIB),
                                 ('--opt-level', args.opt_level, DEFAULT_OPT_LEVEL)):
        if value != default:
            cmd += [flag, str(value)]
    if args.timing_cache:
        cmd += ['--timing-cache', str(args.timing_cache)]
    return shlex.join(cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m export.trt', description=__doc__.split('\n\n')[0])
    add_model_args(parser)
    parser.add_argument('--fp16', action='store_true', help='convert the ONNX model to mixed FP16 and build from it')
    parser.add_argument('--onnx-only', action='store_true', help='stop after the ONNX artefacts (exit 0)')
    parser.add_argument('--from-onnx', type=Path, default=None,
                        help='skip the export: build from this ONNX file written by export.onnx / export.fp16')
    parser.add_argument('--min-batch', type=int, default=1)
    parser.add_argument('--opt-batch', type=int, default=64)
    parser.add_argument('--max-batch', type=int, default=256)
    parser.add_argument('--workspace-gib', type=float, default=DEFAULT_WORKSPACE_GIB)
    parser.add_argument('--opt-level', type=int, default=DEFAULT_OPT_LEVEL, choices=range(6),
                        help='builder optimisation level (0 fastest build .. 5 longest search)')
    parser.add_argument('--timing-cache', type=Path, default=None,
                        help='timing cache file (default: OUTPUT/timing.cache)')
    parser.add_argument('--verbose', action='store_true', help='TensorRT verbose log')
    add_fp16_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 engine built (or --onnx-only done), 3 no GPU / TensorRT here (ONNX artefacts written)."""
    args = build_parser().parse_args(argv)
    profile = Profile(args.min_batch, args.opt_batch, args.max_batch)
    output = Path(args.output)
    artefacts: list[Path] = []
    if args.from_onnx is None:
        result = onnx_stage_from_args(args)
        onnx_path = result['onnx']
        artefacts += [onnx_path, result['parity_report']]
    else:
        onnx_path = args.from_onnx
        if not onnx_path.is_file():
            raise FileNotFoundError(f'--from-onnx: {onnx_path} not found')
        check_onnx(onnx_path)
    _, meta = read_onnx_metadata(onnx_path)
    if args.fp16 and meta.get('precision') == 'fp32':
        fp16 = run_fp16_stage(onnx_path, data_dir=args.data_dir, calib_split=args.calib_split,
                              calib_samples=args.calib_samples, parity_split=args.fp16_parity_split,
                              parity_samples=args.fp16_parity_samples, data_max=args.data_max,
                              batch_size=args.batch_size, require_targets=args.require_fp16_targets)
        onnx_path = fp16['fp16_onnx']
        artefacts += [onnx_path, fp16['fp16_parity_report']]
    if args.onnx_only:
        print(f'ONNX stage done: {", ".join(str(p) for p in artefacts) or onnx_path} (--onnx-only: no engine)')
        return 0
    env = probe()
    if not env.can_build:
        print('TensorRT engine NOT built: ' + '; '.join(env.missing()), file=sys.stderr)
        if artefacts:
            print('Written here: ' + ', '.join(str(p) for p in artefacts), file=sys.stderr)
        print("To finish on a machine with an NVIDIA GPU: pip install -e '.[trt]' && "
              + finish_command(onnx_path, args), file=sys.stderr)
        return EXIT_NO_GPU
    plan_path, json_path = build_from_onnx(
        onnx_path, output, env.gpus[0], env.tensorrt_version, profile=profile, workspace_gib=args.workspace_gib,
        opt_level=args.opt_level, timing_cache=args.timing_cache, verbose=args.verbose)
    print(f'Wrote {plan_path} ({plan_path.stat().st_size / 2**20:.1f} MiB, TensorRT {env.tensorrt_version}, '
          f'{env.gpus[0].name}) and {json_path}')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except (ExportError, ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f'error: {e}')
