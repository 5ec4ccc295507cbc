"""Build a TensorRT 11 engine from a checkpoint, with its sidecar JSON: FP32, or mixed FP16 with --fp16.

    python -m export.trt --model inception_v4_pcam --checkpoint best.pth.tar --output runs/export --fp16
    python -m export.trt --from-onnx runs/export/inception_v4_pcam.fp16.onnx --output runs/export   # on the GPU box

Stages: ONNX export + PyTorch parity (export.onnx), FP16 conversion + FP16-vs-FP32 report (export.fp16, with
--fp16), then the engine: `<name>[.fp16].plan`, its sidecar `<plan>.json` and a persistent timing cache. Without a
GPU or TensorRT the ONNX artefacts are still written and the command exits with status 3, saying what is missing and
the command that finishes the build on a GPU machine. `--onnx-only` stops after the ONNX artefacts with status 0.

TensorRT 11: networks are strongly typed and there is no FP16 builder flag, so the precision is the ONNX graph's
(`--fp16` converts it; without it the engine is FP32). TF32, on by default in TensorRT's builder, is cleared so FP32
layers compute in FP32. `--version-compatible` builds a plan that later TensorRT 11.x releases, and the lean runtime
(libnvinfer_lean), can load; an ordinary plan needs the full libnvinfer of the release that built it.
Default optimisation profile: batch min 1 / opt 64 / max 256: kernels are tuned for 64 patches per launch
(already enough 96x96 patches to fill a data-centre GPU), 256 bounds activation memory; larger inputs are split
by the runners. Workspace 4 GiB, builder optimisation level 3 (TensorRT's default; 5 searches longest).
"""
import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from timm_inception_pcam import errors
from timm_inception_pcam.errors import ArgumentParser, MissingFileError, UsageError
from timm_inception_pcam.storage import atomic_path, atomic_write_bytes, file_sha256

from .fp16 import add_fp16_args, check_fp16_args, run_fp16_stage
from .gpu import GpuInfo, probe
from .onnx import (
    ExportError,
    add_artefact_args,
    add_model_args,
    check_artefact_args,
    check_onnx,
    onnx_stage_from_args,
    read_onnx_metadata,
)
from .sidecar import Profile, make_sidecar, sidecar_path, write_sidecar
from .spec import IOSpec

__all__ = ['EXIT_NO_GPU', 'build_engine', 'build_from_onnx', 'finish_command', 'main']

EXIT_NO_GPU = 3
DEFAULT_WORKSPACE_GIB = 4.0
DEFAULT_OPT_LEVEL = 3
_logger = logging.getLogger(__name__)


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ExportError(f"TensorRT is needed to build engines ({e}); install it with pip install -e '.[trt]' "
                          'on a machine with an NVIDIA GPU') from e
    return trt


def load_timing_cache(config: Any, timing_cache: Path) -> Any:
    """Attach the timing cache in `timing_cache` (or a new one) to the builder config; None when there is none.

    A cache from another TensorRT version or GPU can make `create_timing_cache` return None or raise, and
    `set_timing_cache` refuse it: then a fresh cache is tried, and failing that the build goes on without one.
    """
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b''
    attempts = [(cache_bytes, str(timing_cache))] if cache_bytes else []
    attempts.append((b'', 'a new timing cache'))
    for data, what in attempts:
        try:
            cache = config.create_timing_cache(data)
            if cache is not None and config.set_timing_cache(cache, False):
                return cache
        except Exception as e:  # TensorRT raises RuntimeError/TypeError on foreign caches, depending on the version
            _logger.warning('TensorRT could not load %s (%s: %s)', what, type(e).__name__, e)
            continue
        _logger.warning('TensorRT could not use %s (made by another TensorRT version or GPU?)', what)
    _logger.warning('building without a timing cache: kernel timings are measured afresh and not saved')
    return None


def configure_builder(trt: Any, config: Any, *, workspace_bytes: int, opt_level: int,
                      version_compatible: bool) -> None:
    """Workspace, optimisation level, TF32 off (FP32 layers compute in FP32), VERSION_COMPATIBLE when asked."""
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.builder_optimization_level = opt_level
    config.clear_flag(trt.BuilderFlag.TF32)
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)


def build_engine(onnx_path: Path, spec: IOSpec, *, profile: Profile, workspace_bytes: int, opt_level: int,
                 timing_cache: Path, verbose: bool = False, version_compatible: bool = False) -> bytes:
    """Serialised plan. Call only after `export.gpu.probe()` found a GPU: TensorRT objects can crash without one."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network()
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        for error in errors:
            _logger.error('TensorRT ONNX parser: %s', error)
        raise ExportError(f'{onnx_path}: TensorRT could not parse the model ({len(errors)} errors, logged above)')
    if network.num_inputs != 1 or network.get_input(0).name != spec.input_name:
        names = [network.get_input(i).name for i in range(network.num_inputs)]
        raise ExportError(f'{onnx_path}: network inputs are {names}, expected [{spec.input_name!r}]')
    tensor = network.get_input(0)
    sample_shape = tuple(tensor.shape)[1:]
    config = builder.create_builder_config()
    configure_builder(trt, config, workspace_bytes=workspace_bytes, opt_level=opt_level,
                      version_compatible=version_compatible)
    cache = load_timing_cache(config, timing_cache)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(spec.input_name, (profile.min, *sample_shape), (profile.opt, *sample_shape),
                          (profile.max, *sample_shape))
    config.add_optimization_profile(opt_profile)
    _logger.info('Building the TensorRT engine from %s (profile %s, opt level %d%s); this takes minutes',
                 onnx_path.name, profile.as_dict(), opt_level, ', version-compatible' if version_compatible else '')
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f'{onnx_path}: TensorRT failed to build the engine (see the log above)')
    if cache is not None:
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _parser_error(error: Any) -> str:
    try:
        return f'{error.code()}: {error.desc()} (node {error.node()} {error.node_name()!r})'
    except Exception:
        return str(error)


def build_from_onnx(onnx_path: Path, output: Path, gpu: GpuInfo, tensorrt_version: str, *, profile: Profile,
                    workspace_gib: float, opt_level: int, timing_cache: Path | None = None,
                    verbose: bool = False, version_compatible: bool = False) -> tuple[Path, Path]:
    """Plan + sidecar for a model written by export.onnx / export.fp16. Returns (plan path, sidecar path)."""
    check_onnx(onnx_path)
    spec, meta = read_onnx_metadata(onnx_path)
    plan_path = output / (onnx_path.name.removesuffix('.onnx') + '.plan')
    timing_cache = timing_cache or output / 'timing.cache'
    plan = build_engine(onnx_path, spec, profile=profile, workspace_bytes=int(workspace_gib * 2**30),
                        opt_level=opt_level, timing_cache=timing_cache, verbose=verbose,
                        version_compatible=version_compatible)
    with atomic_path(plan_path, suffix='.plan') as tmp:
        tmp.write_bytes(plan)
        sidecar = make_sidecar(
            model=meta.get('model') or plan_path.stem, tensorrt_version=tensorrt_version, gpu=gpu.as_sidecar(),
            precision=meta.get('precision', 'fp32'), spec=spec, profile=profile,
            checkpoint_sha256=meta.get('checkpoint_sha256'), onnx_sha256=file_sha256(onnx_path),
            plan_sha256=file_sha256(tmp), version_compatible=version_compatible,
            training_data_provenance=meta.get('training_data_provenance') or 'unknown')
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
    if args.version_compatible:
        cmd.append('--version-compatible')
    return shlex.join(cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog='python -m export.trt', description=__doc__.split('\n\n')[0])
    add_model_args(parser)
    add_artefact_args(parser)
    parser.add_argument('--fp16', action='store_true',
                        help='convert the ONNX model to mixed FP16 and build from it (default: FP32 engine)')
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
    parser.add_argument('--version-compatible', action='store_true',
                        help='TensorRT VERSION_COMPATIBLE plan: loads in later TensorRT 11.x releases and in the lean '
                             'runtime (libnvinfer_lean); recorded in the sidecar')
    parser.add_argument('--verbose', action='store_true', help='TensorRT verbose log')
    add_fp16_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 engine built (or --onnx-only done), 3 no GPU / TensorRT here (ONNX artefacts written)."""
    args = build_parser().parse_args(argv)
    try:
        profile = Profile(args.min_batch, args.opt_batch, args.max_batch)
    except ValueError as e:
        raise UsageError(f'--min-batch/--opt-batch/--max-batch: {e}') from None
    errors.check_range('--workspace-gib', args.workspace_gib, 0, low_open=True)
    check_artefact_args(args)  # --output, --name, ...: found before minutes of export, not after
    if args.fp16:
        check_fp16_args(args)
    output = Path(args.output)
    artefacts: list[Path] = []
    if args.from_onnx is None:
        result = onnx_stage_from_args(args)
        onnx_path = result['onnx']
        artefacts += [onnx_path, result['parity_report']]
    else:
        onnx_path = args.from_onnx
        if not onnx_path.is_file():
            raise MissingFileError(f'--from-onnx: {onnx_path} not found (expected an ONNX file written by export.onnx)')
        check_onnx(onnx_path)
    _, meta = read_onnx_metadata(onnx_path)
    if args.fp16 and meta.get('precision') == 'fp32':
        fp16 = run_fp16_stage(onnx_path, data_dir=args.data_dir, calib_split=args.calib_split,
                              calib_samples=args.calib_samples, parity_split=args.fp16_parity_split,
                              parity_samples=args.fp16_parity_samples, data_max=args.data_max,
                              batch_size=args.batch_size, require_targets=args.require_fp16_targets, output=output)
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
        opt_level=args.opt_level, timing_cache=args.timing_cache, verbose=args.verbose,
        version_compatible=args.version_compatible)
    print(f'Wrote {plan_path} ({plan_path.stat().st_size / 2**20:.1f} MiB, TensorRT {env.tensorrt_version}, '
          f'{env.gpus[0].name}) and {json_path}')
    return 0


if __name__ == '__main__':
    sys.exit(errors.cli(main, 'python -m export.trt'))
