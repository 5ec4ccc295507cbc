"""The onnxruntime engine (CPU provider) on an ONNX file written by `export.onnx` / `export.fp16`, as a `Runner`.

The file's metadata (key `timm_inception_pcam`) says how patches are prepared (normalised float32 NCHW on the host,
or raw uint8 NHWC when the preprocessing is baked into the graph), the label names and the precision (fp32, or
fp16 for a converted model; its inputs and outputs stay float32).
"""
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..errors import CheckpointError, ExportError, MissingFileError, UsageError
from ..preprocess import batch_slices
from .base import RunnerSpec, collect_logits

if TYPE_CHECKING:
    from export.spec import IOSpec

__all__ = ['OnnxRunner', 'read_onnx_metadata', 'ort_options']


def load_onnx_proto(path: str | Path, source: str | None = None) -> onnx.ModelProto:
    """The ONNX model in `path`, or an error naming the file: missing, empty, unreadable, or with no graph."""
    path = Path(path)
    source = source or str(path)
    if not path.is_file():
        raise MissingFileError(f'{source}: a folder, expected an ONNX file' if path.is_dir()
                               else f'{source}: ONNX file not found')
    if path.stat().st_size == 0:
        raise ExportError(f'{source}: empty file (0 bytes); expected an ONNX model written by export.onnx')
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends name no file: this does
        first = (str(e).strip().splitlines() or [''])[0][:200]
        raise ExportError(f'{source}: not a readable ONNX model ({type(e).__name__}: {first})') from None
    if not len(model.graph.node):
        raise ExportError(f'{source}: not an ONNX model (no graph nodes); expected a model written by export.onnx')
    return model


def read_onnx_metadata(model: str | Path | onnx.ModelProto, source: str | None = None) -> tuple['IOSpec', dict]:
    """(IOSpec, the whole metadata dict: model, checkpoint sha256, precision, ...) stored by `export_onnx`."""
    from export.spec import ONNX_METADATA_KEY, IOSpec

    if not isinstance(model, onnx.ModelProto):
        source = source or str(model)
        model = load_onnx_proto(model, source)
    source = source or 'ONNX model'
    props = {p.key: p.value for p in model.metadata_props}
    if ONNX_METADATA_KEY not in props:
        raise ExportError(f'{source}: no {ONNX_METADATA_KEY!r} metadata; expected a model written by export.onnx')
    try:
        meta = json.loads(props[ONNX_METADATA_KEY])
    except ValueError as e:
        raise ExportError(f'{source}: its {ONNX_METADATA_KEY!r} metadata is not JSON ({e})') from None
    return IOSpec.from_dict(meta, source), meta


def ort_options(threads: int | None = None):
    """onnxruntime session options for shared CPUs: no busy-waiting worker threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    if threads:
        options.intra_op_num_threads = threads
    return options


class OnnxRunner:
    """onnxruntime (CPU) on an ONNX file or in-memory model: uint8 NHWC patches -> float32 logits, batched.

    `.io` is the file's IOSpec (graph input/output contract), `.metadata` the whole stored record.
    """

    def __init__(self, path: str | Path | onnx.ModelProto, batch_size: int = 64, threads: int | None = None,
                 name: str | None = None):
        import onnxruntime as ort

        if batch_size < 1:
            raise UsageError(f'batch_size must be at least 1, got {batch_size}')
        in_memory = isinstance(path, onnx.ModelProto)
        self.path = Path(name or ('<in-memory model>' if in_memory else path))
        if not in_memory and not Path(path).is_file():
            raise CheckpointError(f'{path}: no such ONNX file')
        self.io, self.metadata = read_onnx_metadata(path, str(self.path))
        source = path.SerializeToString() if in_memory else str(path)
        self.session = ort.InferenceSession(source, ort_options(threads), providers=['CPUExecutionProvider'])
        self.batch_size = batch_size
        extra = {k: self.metadata.get(k) for k in ('model', 'checkpoint_sha256', 'fp32_source_sha256',
                                                   'training_data_provenance')
                 if self.metadata.get(k) is not None}
        self.spec = RunnerSpec(backend='onnxruntime', precision=str(self.metadata.get('precision', 'fp32')),
                               source=str(self.path), device='cpu', mean=self.io.mean, std=self.io.std,
                               label_names=self.io.label_names,
                               extra={**extra, 'baked_in': self.io.baked_in, 'activation': self.io.activation,
                                      'onnxruntime': ort.__version__})

    def __repr__(self) -> str:
        return f'OnnxRunner({str(self.path)!r}, precision={self.spec.precision!r}, batch_size={self.batch_size})'

    def logits(self, patches: np.ndarray) -> np.ndarray:
        """uint8 (N, 96, 96, 3) NHWC patches -> float32 logits (N, num_classes)."""
        x = self.io.prepare(patches, source=str(self.path))
        return self.io.to_logits(collect_logits(
            lambda s: self.session.run([self.io.output_name], {self.io.input_name: x[s]})[0],
            batch_slices(len(x), self.batch_size), len(self.io.label_names), str(self.path)))

    def close(self) -> None:
        self.session = None
