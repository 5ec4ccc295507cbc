"""OpenVINO on the CPU: a PCam model converted once, then compiled for float32, bfloat16 or int8 (NNCF).

    runner = OpenVINORunner(model, 'bf16')               # nn.Module: converted, cached on disk, compiled
    logits = runner.logits(patches)                      # uint8 (N, 96, 96, 3) -> float32 (N, 2)

Converted (and, for int8, quantised) models are cached under `cache_dir` (default
`$TIMM_INCEPTION_PCAM_OPENVINO_CACHE`, else `$XDG_CACHE_HOME/timm-inception-pcam/openvino`), keyed by the sha256 of
the weights, int8 or not (fp32 and bf16 compile the same converted graph), the OpenVINO version and, for int8, the
calibration patches, so a second run does not convert or calibrate again. Every new checkpoint adds an entry
(full-size inception_v4_pcam: 165 MB), so the least recently used ones are removed beyond
`$TIMM_INCEPTION_PCAM_OPENVINO_CACHE_GB` (default 4) gigabytes. An int8 entry also records the CPUs on which a cascade
found it costlier than it saved (`record_costly`): `cached_int8` offers the others to the factory's `auto`. An IR
file (`.xml` with its `.bin`, as `python -m export.openvino` writes it) is compiled as it is.

On CPUs with AMX or AVX-512 bf16, OpenVINO's default inference precision is bf16: `fp32` sets it to f32 explicitly.
int8 quantises what NNCF's post-training quantisation selects and runs the rest in f32. Low precisions change a
few decisions: `inference.check` bounds that error and re-runs the patches in doubt at a higher precision.

The compiled model takes the uint8 NHWC patches themselves: the normalisation and the layout change are added to the
graph (OpenVINO's PrePostProcessor), from the same mean/std: the same logits as NumPy preprocessing, about 10 %
faster at batch 64. `hint='throughput'` (the default) runs one stream per core and splits every batch across them
(about 5 % faster than one request on both cores, batches of 64, 2 cores); `hint='latency'` is one request on all
cores, the faster for a handful of patches (the checks' float32 re-runs).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..constants import PCAM_INPUT_SIZE, PCAM_MEAN, PCAM_STD
from ..errors import InferenceError, UsageError
from ..preprocess import batch_slices, check_patches, model_normalization, preprocess_patches
from ..storage import atomic_write_json, file_sha256, staging_dir
from .base import RunnerSpec, check_normalization, model_name_of

if TYPE_CHECKING:
    from export.spec import IOSpec

__all__ = ['OV_PRECISIONS', 'OV_HINTS', 'OpenVINORunner', 'ir_precision', 'openvino_version', 'weights_sha256',
           'default_cache_dir', 'cache_limit_bytes', 'prune_cache', 'convert_to_openvino', 'default_calibration',
           'cached_model', 'cached_int8', 'this_cpu', 'module_normalization']

OV_PRECISIONS = ('fp32', 'bf16', 'int8')
OV_HINTS = ('throughput', 'latency')
_HINTS = {'fp32': 'f32', 'bf16': 'bf16', 'int8': 'f32'}
CACHE_FORMAT = 'timm-inception-pcam-openvino/2'  # 2: int8 with full bias correction
CACHE_DIR_ENV, CACHE_GB_ENV = 'TIMM_INCEPTION_PCAM_OPENVINO_CACHE', 'TIMM_INCEPTION_PCAM_OPENVINO_CACHE_GB'
DEFAULT_CACHE_GB = 4.0
STALE_PARTIAL_S = 24 * 3600  # a conversion folder left this long by a killed process is removed
SS_DISABLE = 2  # sigaltstack's flag: no alternate stack
COSTLY_FIGURES = ('seen', 'passed_on', 'seconds', 'dropped_after')  # what `record_costly` keeps of a check's stage

_logger = logging.getLogger(__name__)


def _openvino():
    try:
        import openvino
    except ImportError as e:
        raise InferenceError(f'OpenVINO is not installed ({e}); install it with: pip install openvino nncf') from None
    return openvino


def openvino_version() -> str:
    return _openvino().__version__.split('-')[0]


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    return Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'timm-inception-pcam' / 'openvino'


def cache_limit_bytes() -> int:
    """The cache's size limit: `$TIMM_INCEPTION_PCAM_OPENVINO_CACHE_GB` (default 4) gigabytes."""
    value = os.environ.get(CACHE_GB_ENV, '').strip()
    try:
        gb = float(value) if value else DEFAULT_CACHE_GB
    except ValueError:
        gb = float('nan')
    if not gb >= 0:
        raise UsageError(f'{CACHE_GB_ENV}={value!r}: expected a size in gigabytes (a number >= 0)')
    return int(gb * 1e9)


def _entry_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def prune_cache(root: Path, keep: Path, limit: int) -> list[Path]:
    """Remove the least recently used entries under `root` (never `keep`) until the rest fit in `limit` bytes.

    An entry's last use is its meta.json's modification time (a cache hit touches it). Conversion folders a killed
    process left behind are removed after a day. Returns the removed entries.
    """
    import time

    entries, removed = [], []
    for folder in root.iterdir():
        try:
            if folder.name.startswith('.') and folder.name.endswith('.partial'):
                if time.time() - folder.stat().st_mtime > STALE_PARTIAL_S:
                    shutil.rmtree(folder, ignore_errors=True)
            elif folder.is_dir() and (folder / 'meta.json').is_file():
                entries.append(((folder / 'meta.json').stat().st_mtime, _entry_bytes(folder), folder))
        except OSError:  # removed meanwhile by another process
            continue
    total = sum(size for _, size, _ in entries)
    for _, size, folder in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if folder == keep:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        total -= size
        removed.append(folder)
    return removed


def weights_sha256(model: Any) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes, bytes): the identity of what is converted."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f'{name}:{t.dtype}:{tuple(t.shape)};'.encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return digest.hexdigest()


def default_calibration(n: int = 256, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """Seeded synthetic PCam-like patches (half metastatic) for int8 calibration when the caller gives none."""
    from ..data.synth import render_patches, stamp_banks

    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2).astype(np.uint8)
    patches, _ = render_patches(rng, labels, stamp_banks(rng))
    return patches, {'source': f'synthetic PCam-like patches (timm_inception_pcam.data.synth, seed {seed})',
                     'seed': seed, 'synthetic': True}


def _batches(patches: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], batch_size: int):
    for s in batch_slices(len(patches), batch_size):
        yield preprocess_patches(patches[s], mean, std, source=f'calibration patches {s.start}..{s.stop - 1}')


def convert_to_openvino(model: Any, precision: str = 'fp32', calibration: np.ndarray | None = None,
                        mean: tuple[float, ...] = PCAM_MEAN, std: tuple[float, ...] = PCAM_STD) -> Any:
    """An `openvino.Model` of `model` (dynamic batch); int8 quantised with NNCF on `calibration` uint8 patches."""
    import torch

    ov = _openvino()
    c, h, w = PCAM_INPUT_SIZE
    model = model.eval()
    with torch.inference_mode(), warnings.catch_warnings():
        # OpenVINO's converter traces the module: torch's deprecation notice of jit.trace is OpenVINO's to act on
        warnings.filterwarnings('ignore', category=FutureWarning, message=r'`?torch\.jit\.trace')
        ov_model = ov.convert_model(model, example_input=torch.zeros(1, c, h, w))
    ov_model.reshape([-1, c, h, w])
    if precision == 'int8':
        if calibration is None or len(calibration) == 0:
            raise UsageError('int8 needs calibration patches: pass uint8 (N, 96, 96, 3) patches (e.g. 512 from the '
                             'training split)')
        import nncf

        batches = list(_batches(calibration, mean, std, 64))
        # Full bias correction (not NNCF's fast one): on the benchmark's inception_v4_pcam it cut the int8 margin
        # error near the threshold from 0.42 to 0.063 logits (90th percentile), for about twice the quantisation time.
        # NNCF loads torch's extension builder, which warns "No CUDA runtime is found" on a CPU machine that has a
        # CUDA toolkit: nothing here uses CUDA.
        cpp_extension_log = logging.getLogger('torch.utils.cpp_extension')
        level = cpp_extension_log.level
        cpp_extension_log.setLevel(logging.ERROR)
        try:
            ov_model = nncf.quantize(ov_model, nncf.Dataset(batches), subset_size=len(batches),  # items are batches
                                     fast_bias_correction=False)
        finally:
            cpp_extension_log.setLevel(level)
    return ov_model


def _key_parts(digest: str, precision: str, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    """What a cache entry is keyed by (besides int8's calibration). fp32 and bf16 compile the same converted graph
    (the precision is a compile hint): one entry serves both."""
    return {'format': CACHE_FORMAT, 'weights_sha256': digest, 'graph': 'int8' if precision == 'int8' else 'float',
            'openvino': openvino_version(), 'mean': list(mean), 'std': list(std)}


def module_normalization(model: Any, mean: tuple[float, ...] | None,
                         std: tuple[float, ...] | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) a module's runner uses: those given, else the model's pretrained_cfg's."""
    norm = model_normalization(model)
    return check_normalization(mean or norm[0], 'mean'), check_normalization(std or norm[1], 'std')


def this_cpu() -> str:
    """Whose costs a cascade measured: the CPU's model name and this machine's core count."""
    from ..device import cpu_model_name

    return f'{cpu_model_name()}; {os.cpu_count()} cores'


def cached_int8(digest: str, mean: tuple[float, ...], std: tuple[float, ...],
                cache_root: Path | None = None) -> str | None:
    """The calibration sha256 of the most recently used cached int8 model of these weights that no cascade on this
    CPU found costlier than it saved (`OpenVINORunner.record_costly`); None without one. Marks its use."""
    root = cache_root or default_cache_dir()
    want = _key_parts(digest, 'int8', mean, std)
    found = []
    for meta_path in root.glob('*/meta.json') if root.is_dir() else ():
        try:
            meta, used = json.loads(meta_path.read_text()), meta_path.stat().st_mtime
        except (OSError, ValueError):
            continue
        if (isinstance(meta, dict) and all(meta.get(k) == v for k, v in want.items())
                and meta.get('calibration_sha256') and this_cpu() not in (meta.get('costly_on') or {})
                and (meta_path.parent / 'model.xml').is_file()):
            found.append((used, meta_path, meta['calibration_sha256']))
    if not found:
        return None
    _, meta_path, sha = max(found)
    with contextlib.suppress(OSError):
        os.utime(meta_path)  # its use, before a concurrent prune could take it
    return sha


def cached_model(model: Any, precision: str, calibration: np.ndarray | None = None,
                 calibration_info: Mapping[str, Any] | None = None, mean: tuple[float, ...] = PCAM_MEAN,
                 std: tuple[float, ...] = PCAM_STD, cache_root: Path | None = None, digest: str | None = None,
                 calibration_sha256: str | None = None, core: Any = None) -> tuple[Any, dict[str, Any]]:
    """(`openvino.Model`, what the cache says of it): `model` converted (int8: quantised on `calibration`), from the
    cache (module docstring) when it holds it, else converted and added to it. `digest`: the `weights_sha256`, when
    the caller has it; `calibration_sha256` instead of `calibration`: the cached int8 model of those patches; `core`:
    the caller's `openvino.Core`, to read a cached model with."""
    cache_root = cache_root or default_cache_dir()
    digest = digest or weights_sha256(model)
    key_parts = _key_parts(digest, precision, mean, std)
    if precision == 'int8' and calibration is not None:
        key_parts['calibration_sha256'] = hashlib.sha256(np.ascontiguousarray(calibration).tobytes()).hexdigest()
    elif precision == 'int8' and calibration_sha256:
        key_parts['calibration_sha256'] = calibration_sha256
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:32]
    folder = cache_root / key
    xml = folder / 'model.xml'
    info = {'cache': str(folder), 'cache_hit': False, 'weights_sha256': key_parts['weights_sha256']}
    if xml.is_file():
        with contextlib.suppress(OSError):  # a read-only shared cache is used as it is
            os.utime(folder / 'meta.json')  # its last use, before reading it: another process prunes the oldest
        try:
            meta = json.loads((folder / 'meta.json').read_text())
            ov_model = (core or _openvino().Core()).read_model(str(xml))
        except (OSError, ValueError, RuntimeError) as e:  # damaged (or pruned meanwhile): a miss, converted again
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            _logger.warning('OpenVINO cache: %s is unreadable (%s); converting again', folder, first)
            shutil.rmtree(folder, ignore_errors=True)
        else:
            info.update(cache_hit=True, calibration=meta.get('calibration') if isinstance(meta, dict) else None)
            return ov_model, info
    if 'calibration_sha256' in key_parts and calibration is None:
        raise UsageError(f'{folder}: no readable cached int8 model of these weights for calibration '
                         f'{calibration_sha256} (removed meanwhile?): pass calibration patches to quantise it again')
    limit = cache_limit_bytes()
    ov_model = convert_to_openvino(model, precision, calibration, mean, std)
    calib = None
    if precision == 'int8':
        calib = {'n': int(len(calibration)), 'sha256': key_parts['calibration_sha256'],
                 **dict(calibration_info or {})}
    tmp = staging_dir(cache_root, key)
    try:
        _openvino().save_model(ov_model, str(tmp / 'model.xml'), compress_to_fp16=False)
        (tmp / 'meta.json').write_text(json.dumps({**key_parts, 'calibration': calib}, indent=2) + '\n')
        try:
            os.replace(tmp, folder)  # another process may have filled it meanwhile: theirs is as good
        except OSError:
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for gone in prune_cache(cache_root, folder, limit):
        _logger.info('OpenVINO cache: removed %s (least recently used; the cache keeps %.1f GB, %s)', gone,
                     limit / 1e9, CACHE_GB_ENV)
    info['calibration'] = calib
    return ov_model, info


class OpenVINORunner:
    """A PCam classifier compiled by OpenVINO for the CPU; a `Runner` (uint8 NHWC patches in, float32 logits out)."""

    def __init__(
            self,
            model: Any,
            precision: str = 'fp32',
            *,
            batch_size: int = 64,
            threads: int | None = None,
            hint: str = 'throughput',
            cache_dir: str | Path | None = None,
            calibration: np.ndarray | None = None,
            calibration_info: Mapping[str, Any] | None = None,
            mean: tuple[float, ...] | None = None,
            std: tuple[float, ...] | None = None,
            weights_digest: str | None = None,
            calibration_sha256: str | None = None,
    ) -> None:
        """`weights_digest`: the module's `weights_sha256`, when the caller already has it (a check builds two or
        three runners of one module; hashing full-size inception_resnet_v2_pcam takes 0.2 s each time).
        `calibration_sha256` (int8, without `calibration`): the cached int8 model of these weights quantised on those
        calibration patches (`cached_int8` finds one); its patches are not needed once it is cached."""
        if precision not in OV_PRECISIONS:
            raise UsageError(f'OpenVINO precision {precision!r} not supported: expected one of '
                             f'{", ".join(OV_PRECISIONS)}')
        if batch_size < 1:
            raise UsageError(f'batch_size must be >= 1, got {batch_size}')
        if hint not in OV_HINTS:
            raise UsageError(f'OpenVINO performance hint {hint!r} not supported: expected one of {", ".join(OV_HINTS)}')
        ov = _openvino()
        self.precision, self.batch_size = precision, batch_size
        self._core = ov.Core()
        extra: dict[str, Any] = {'openvino': openvino_version()}
        if isinstance(model, (str, Path)):
            xml = Path(model)
            if not xml.is_file() or not xml.with_suffix('.bin').is_file():
                raise InferenceError(f'{xml}: OpenVINO IR not found; expected the .xml with its .bin beside it')
            meta = _read_ir_meta(xml)
            mean = check_normalization(mean or meta.get('mean', PCAM_MEAN), 'mean')
            std = check_normalization(std or meta.get('std', PCAM_STD), 'std')
            label_names = tuple(meta.get('label_names', ('normal', 'metastatic')))
            ir_precision = meta.get('precision', 'fp32')
            if ir_precision == 'int8' and precision != 'int8':
                raise UsageError(f'{xml}: an int8 IR runs as int8, not {precision}')
            if precision == 'int8' and ir_precision != 'int8':
                raise UsageError(f'{xml}: a {ir_precision} IR runs as fp32 or bf16, not int8 (an int8 IR comes from '
                                 f'python -m export.openvino --precision int8)')
            try:
                ov_model, source = self._core.read_model(str(xml)), str(xml)
            except RuntimeError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise InferenceError(f'{xml}: not a readable OpenVINO IR ({first})') from None
            io, embedded = _embedded_io(ov_model, source)
            if io is not None:
                mean, std, label_names = io.mean, io.std, io.label_names
            extra['ir'] = meta
            for key in ('model', 'checkpoint_sha256', 'training_data_provenance'):  # where the IR came from
                if meta.get(key) or embedded.get(key):
                    extra[key] = meta.get(key) or embedded.get(key)
        else:
            io = None
            mean, std = module_normalization(model, mean, std)
            label_names = tuple((getattr(model, 'pretrained_cfg', None) or {}).get('label_names',
                                                                                  ('normal', 'metastatic')))
            ov_model, cache_info = cached_model(model, precision, calibration, calibration_info, mean, std,
                                                Path(cache_dir) if cache_dir else None, weights_digest,
                                                calibration_sha256, self._core)
            source = 'module'
            extra.update(cache_info, model=model_name_of(model))
        config: dict[str, Any] = {'INFERENCE_PRECISION_HINT': _HINTS[precision], 'PERFORMANCE_HINT': hint.upper()}
        if threads:
            config['INFERENCE_NUM_THREADS'] = int(threads)
        if io is None or not io.baked_in:
            _check_normalized_input(ov_model, source)
            ov_model = _raw_patch_input(ov_model, mean, std)
        self._to_logits = io.to_logits if io is not None else (lambda out: out)
        self._compiled = self._core.compile_model(ov_model, 'CPU', config)
        widen_signal_stack()
        self._requests = max(1, int(self._compiled.get_property('OPTIMAL_NUMBER_OF_INFER_REQUESTS')))
        self._queue = ov.AsyncInferQueue(self._compiled, self._requests)
        self._queue.set_callback(_store_output)
        self._mean, self._std = tuple(mean), tuple(std)
        extra.update(hint=hint, infer_requests=self._requests)
        self.spec = RunnerSpec(backend=f'openvino_{precision}', precision=precision, source=source, device='cpu',
                               mean=self._mean, std=self._std, label_names=label_names, extra=extra)

    def record_costly(self, stage: Mapping[str, Any]) -> None:
        """Note in this model's cache entry that a cascade found it costlier than it saved on this CPU (`stage`: the
        check's figures for it), so that `cached_int8` no longer offers it to `auto` here. No-op for an IR."""
        folder = self.spec.extra.get('cache')
        if not folder:
            return
        meta_path = Path(folder) / 'meta.json'
        try:
            meta = json.loads(meta_path.read_text())
            meta.setdefault('costly_on', {})[this_cpu()] = {k: stage.get(k) for k in COSTLY_FIGURES}
            atomic_write_json(meta_path, meta)
        except (OSError, ValueError) as e:  # a read-only or pruned entry: the next cascade judges it again
            _logger.info('OpenVINO cache: could not record %s as costly here (%s)', folder, e)

    def logits(self, patches: np.ndarray) -> np.ndarray:
        """uint8 (N, 96, 96, 3) NHWC patches -> float32 logits (N, classes); each batch split across the requests."""
        x = np.ascontiguousarray(check_patches(patches))
        out = np.empty((len(x), len(self.spec.label_names)), np.float32)
        for batch in batch_slices(len(x), self.batch_size):
            step = -(-(batch.stop - batch.start) // self._requests)
            for start in range(batch.start, batch.stop, step):
                part = slice(start, min(start + step, batch.stop))
                self._queue.start_async({0: x[part]}, (out, part))
            self._queue.wait_all()
        return self._to_logits(out)

    def close(self) -> None:
        self._queue = self._compiled = None

    def __enter__(self) -> OpenVINORunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


SIGNAL_STACK_BYTES = 1 << 20
_signal_stacks: list[Any] = []  # the stacks given to threads: alive for as long as the process


def widen_signal_stack() -> None:
    """Give this thread an alternate signal stack large enough for the AMX register state (Linux).

    OpenVINO's CPU plugin sets a small alternate signal stack on the thread that creates it. Python's signal
    handlers run on it (SA_ONSTACK), and once the thread has used AMX its register state no longer fits: the next
    signal (a SIGCHLD from a DataLoader worker or a subprocess ending) kills the process with SIGSEGV (si_code
    SI_KERNEL). A stack of `SIGNAL_STACK_BYTES` replaces it; threads without one are left alone.
    """
    if not sys.platform.startswith('linux'):
        return
    import ctypes

    class StackT(ctypes.Structure):
        _fields_ = [('ss_sp', ctypes.c_void_p), ('ss_flags', ctypes.c_int), ('ss_size', ctypes.c_size_t)]

    libc = ctypes.CDLL(None, use_errno=True)
    current = StackT()
    if libc.sigaltstack(None, ctypes.byref(current)) != 0 or current.ss_flags & SS_DISABLE \
            or current.ss_size >= SIGNAL_STACK_BYTES:
        return
    memory = ctypes.create_string_buffer(SIGNAL_STACK_BYTES)
    if libc.sigaltstack(ctypes.byref(StackT(ctypes.addressof(memory), 0, SIGNAL_STACK_BYTES)), None) == 0:
        _signal_stacks.append(memory)


def _raw_patch_input(ov_model: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    """`ov_model` taking uint8 NHWC patches: (x - 255 mean) / (255 std) and the NCHW transpose added in front."""
    ov = _openvino()
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(ov_model)
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout('NHWC'))
    ppp.input().model().set_layout(ov.Layout('NCHW'))
    ppp.input().preprocess().convert_element_type(ov.Type.f32).mean([255.0 * m for m in mean]) \
        .scale([255.0 * s for s in std])
    return ppp.build()


def _embedded_io(ov_model: Any, source: str) -> tuple[IOSpec | None, dict[str, Any]]:
    """The input/output description an IR converted from one of our ONNX files carries (OpenVINO keeps the ONNX
    metadata in its rt_info; the Triton repository's IR takes raw uint8 patches and returns probabilities); None
    for an IR converted from the module (export.openvino's: float32 NCHW in, logits out, its sidecar beside it).
    Returns (the description, the whole metadata)."""
    from export.spec import ONNX_METADATA_KEY, IOSpec

    key = ['framework', ONNX_METADATA_KEY]
    if not ov_model.has_rt_info(key):
        return None, {}
    try:
        data = json.loads(ov_model.get_rt_info(key).astype(str))
    except ValueError as e:
        raise InferenceError(f'{source}: unreadable {ONNX_METADATA_KEY} metadata ({e})') from None
    return IOSpec.from_dict(data, source), data


def _check_normalized_input(ov_model: Any, source: str) -> None:
    """The IR takes float32 NCHW patches (N, 3, 96, 96), the input the runner's preprocessing is added to."""
    (port,) = ov_model.inputs if len(ov_model.inputs) == 1 else (None,)
    shape = port.get_partial_shape() if port is not None else None
    dims = [d.get_length() if d.is_static else -1 for d in shape] if shape is not None and shape.rank.is_static \
        else []
    if port is None or port.get_element_type().get_type_name() != 'f32' or dims[1:] != list(PCAM_INPUT_SIZE):
        found = 'several inputs' if port is None else f'{port.get_element_type().get_type_name()} {shape}'
        raise InferenceError(f'{source}: the IR takes {found}; expected one float32 input (N, 3, 96, 96), as '
                             f'python -m export.openvino writes it')


def _store_output(request: Any, userdata: tuple[np.ndarray, slice]) -> None:
    out, part = userdata
    out[part] = request.get_output_tensor(0).data


def ir_precision(xml: Path) -> str:
    """The precision an IR was exported at, as its sidecar says (fp32 without one); the files are not hashed here."""
    return _read_sidecar(xml).get('precision') or 'fp32'


def _read_sidecar(xml: Path) -> dict[str, Any]:
    """The sidecar `python -m export.openvino` writes beside an IR, parsed ({} without one)."""
    sidecar = xml.with_name(xml.name + '.json')
    if not sidecar.is_file():
        return {}
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError) as e:
        raise InferenceError(f'{sidecar}: unreadable sidecar ({e})') from None
    if not isinstance(data, dict):
        raise InferenceError(f'{sidecar}: expected a JSON object, found {type(data).__name__}')
    return data


def _read_ir_meta(xml: Path) -> dict[str, Any]:
    """Preprocessing and labels of an IR from its sidecar, if present, after checking the files' sha256s."""
    data = _read_sidecar(xml)
    if not data:
        return {}
    sidecar = xml.with_name(xml.name + '.json')
    digests = data.get('sha256') if isinstance(data.get('sha256'), dict) else {}
    for key, path in (('xml', xml), ('bin', xml.with_suffix('.bin'))):
        if digests.get(key) is not None and digests[key] != file_sha256(path):
            raise InferenceError(f'{path}: sha256 does not match {sidecar.name} (sha256.{key}); the file is truncated '
                                 f'or not the one the sidecar describes: export it again')
    pre = data.get('preprocessing', {}) if isinstance(data.get('preprocessing'), dict) else {}
    return {'mean': pre.get('mean', PCAM_MEAN), 'std': pre.get('std', PCAM_STD),
            'label_names': data.get('label_names', ['normal', 'metastatic']), 'precision': data.get('precision'),
            'model': data.get('model'), 'checkpoint_sha256': digests.get('checkpoint'),
            'training_data_provenance': data.get('training_data_provenance')}
