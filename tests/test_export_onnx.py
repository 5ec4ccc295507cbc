"""ONNX export, FP16 conversion and the no-GPU behaviour of `export.trt`, on a briefly trained reduced-depth model."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import export.onnx as export_onnx
import export.trt as export_trt
from export.fp16 import FP16_MAX, convert_fp16, fp16_emulation, fp32_nodes
from export.gpu import probe
from export.onnx import (
    ExportError,
    OnnxRunner,
    bake_preprocessing,
    check_onnx,
    load_patches,
    read_onnx_metadata,
    torch_logits,
)
from export.spec import ONNX_METADATA_KEY, IOSpec
from timm_inception_pcam.inference import probabilities
from timm_inception_pcam.storage import file_sha256
from timm_inception_pcam.testing import TINY_KWARGS, TINY_MODEL, train_tiny_model

TOLERANCE = 1e-4  # max |logit| difference PyTorch vs onnxruntime FP32


@pytest.fixture(scope='module')
def trained(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Synthetic PCam, a depths=(1,1,1) Inception-v4 trained briefly on it, saved as our checkpoint."""
    from timm_inception_pcam.checkpoint import save_checkpoint
    from timm_inception_pcam.data import synthesize_pcam
    root = tmp_path_factory.mktemp('export')
    data_dir = root / 'pcam'
    synthesize_pcam(data_dir, 96, seed=0, n_valid=192, n_test=8)
    x, y, _ = load_patches(data_dir, 'train', 96)
    model = train_tiny_model(x, y)
    checkpoint = save_checkpoint(root / 'tiny.pth.tar', model, arch=TINY_MODEL, model_kwargs=TINY_KWARGS)
    return SimpleNamespace(root=root, data_dir=data_dir, model=model, checkpoint=checkpoint)


@pytest.fixture(scope='module')
def exported(trained: SimpleNamespace) -> dict:
    """`python -m export.onnx` from the checkpoint (the one full export of this file)."""
    out = trained.root / 'onnx'
    return export_onnx.main(['--checkpoint', str(trained.checkpoint), '--output', str(out), '--data-dir',
                             str(trained.data_dir), '--split', 'valid', '--parity-samples', '32',
                             '--tolerance', str(TOLERANCE)])


def test_onnx_is_single_checked_file_with_dynamic_batch(exported: dict, trained: SimpleNamespace) -> None:
    onnx_path = exported['onnx']
    assert sorted(p.name for p in onnx_path.parent.iterdir()) == [onnx_path.name, onnx_path.name + '.parity.json']
    model = onnx.load_model(str(onnx_path), load_external_data=False)
    assert all(t.data_location != TensorProto.EXTERNAL for t in model.graph.initializer)
    assert max(o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')) >= 18
    check_onnx(onnx_path)  # full checker + strict shape inference + IO contract
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ('input', 'logits')
    assert inp.type.tensor_type.shape.dim[0].dim_param and out.type.tensor_type.shape.dim[0].dim_param
    spec, meta = read_onnx_metadata(onnx_path)
    assert spec == IOSpec()
    assert meta['model'] == TINY_MODEL and meta['precision'] == 'fp32'
    assert meta['checkpoint_sha256'] == file_sha256(trained.checkpoint)
    runner = OnnxRunner(onnx_path, batch_size=3)  # 5 patches -> batches of 3 and 2
    patches, _, _ = load_patches(trained.data_dir, 'test', 5)
    assert runner.logits(patches).shape == (5, 2)
    np.testing.assert_allclose(runner.logits(patches[:1]), runner.logits(patches)[:1], atol=1e-5)


def test_onnx_matches_pytorch_on_varying_outputs(exported: dict, trained: SimpleNamespace) -> None:
    report = exported['parity']
    assert json.loads(exported['parity_report'].read_text()) == json.loads(json.dumps(report))
    assert report['n'] == 32 and report['tolerance'] == TOLERANCE
    assert report['outputs_vary'] and report['passed']
    # Independently, on patches the export never saw: outputs must vary far more than the tolerance.
    patches, labels, _ = load_patches(trained.data_dir, 'valid', 24, offset=100)
    reference = torch_logits(trained.model, patches)
    candidate = OnnxRunner(exported['onnx']).logits(patches)
    assert reference.std(axis=0).min() > 1000 * TOLERANCE
    assert np.abs(reference - candidate).max() <= TOLERANCE
    assert (reference.argmax(1) == labels).mean() > 0.6  # the brief training did learn something


def test_baked_preprocessing_takes_raw_patches(exported: dict, trained: SimpleNamespace, tmp_path: Path) -> None:
    spec = IOSpec(baked_in=True)
    model = onnx.load_model(str(exported['onnx']))
    bake_preprocessing(model, spec)
    helper.set_model_props(model, {ONNX_METADATA_KEY: spec.onnx_metadata(model=TINY_MODEL, precision='fp32')})
    baked = tmp_path / 'baked.onnx'
    onnx.save_model(model, str(baked))
    check_onnx(baked, spec)
    inp = onnx.load_model(str(baked)).graph.input[0].type.tensor_type
    assert inp.elem_type == TensorProto.UINT8 and [d.dim_value for d in inp.shape.dim[1:]] == [96, 96, 3]
    patches, _, _ = load_patches(trained.data_dir, 'valid', 16, offset=40)
    host = OnnxRunner(exported['onnx']).logits(patches)
    inside = OnnxRunner(baked).logits(patches)
    assert host.std(axis=0).min() > 0.1
    np.testing.assert_allclose(inside, host, atol=TOLERANCE)
    with pytest.raises(ValueError, match='uint8'):
        OnnxRunner(baked).logits(patches.astype(np.float32))
    # FP16 of a baked model: preprocessing stays FP32, uint8 input and float32 output kept.
    record = convert_fp16(baked, tmp_path / 'baked.fp16.onnx', patches[:8])
    assert {n for n in record['fp32_nodes'] if n.startswith('preprocess_')} == \
        {'preprocess_cast', 'preprocess_transpose', 'preprocess_mul', 'preprocess_sub'}
    np.testing.assert_allclose(probabilities(OnnxRunner(tmp_path / 'baked.fp16.onnx'), patches),
                               probabilities(OnnxRunner(baked), patches), atol=1e-2)


def test_trt_fp16_without_gpu_writes_onnx_artefacts_and_exits_nonzero(
        exported: dict, trained: SimpleNamespace, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    if probe().can_build:
        pytest.skip('a GPU and TensorRT are present: the no-GPU path is not taken here (see test_export_gpu.py)')
    out = tmp_path / 'engines'  # not the ONNX's folder: the FP16 artefacts go to --output (they went beside the ONNX)
    beside = sorted(exported['onnx'].parent.iterdir())
    rc = export_trt.main(['--from-onnx', str(exported['onnx']), '--fp16', '--output', str(out), '--data-dir',
                          str(trained.data_dir), '--calib-split', 'train', '--calib-samples', '32',
                          '--fp16-parity-split', 'valid', '--fp16-parity-samples', '128'])
    err = capsys.readouterr().err
    assert rc == export_trt.EXIT_NO_GPU
    fp16_path = out / f'{TINY_MODEL}.fp16.onnx'
    assert 'TensorRT engine NOT built' in err and ('GPU' in err or 'TensorRT' in err)
    assert f'python -m export.trt --from-onnx {fp16_path}' in err
    assert not list(out.glob('*.plan')) and not list(out.glob('*.partial*'))
    report = json.loads((out / f'{TINY_MODEL}.fp16.parity.json').read_text())
    assert report['n'] == 128 and report['prob_std_across_inputs'] > 0.1
    assert report['decision_agreement'] >= 0.999 and report['auc_change'] <= 0.001
    assert report['max_abs_prob_diff'] < 0.05 and report['meets_targets']  # no target: a sanity bound
    assert report['auc_fp32'] > 0.6
    model = onnx.load_model(str(fp16_path))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    kinds = [t.data_type for t in model.graph.initializer]
    assert kinds.count(TensorProto.FLOAT16) > 0.9 * len(kinds)
    assert read_onnx_metadata(fp16_path)[1]['precision'] == 'fp16'
    assert sorted(exported['onnx'].parent.iterdir()) == beside


def test_trt_onnx_only_succeeds_without_engine(exported: dict) -> None:
    out = exported['onnx'].parent
    assert export_trt.main(['--from-onnx', str(exported['onnx']), '--onnx-only', '--output', str(out)]) == 0
    assert not list(out.glob('*.plan'))


def _range_model(path: Path) -> Path:
    """pool -> matmul -> x300 -> x300 ('big', beyond FP16's 65504) -> two consumers x1/600 -> add -> x1/300."""
    spec = IOSpec()
    consts = {'w': np.array([[0.5, -0.5], [0.5, 0.5], [0.5, 0.5]], np.float32), 'up': np.array(300, np.float32),
              'down': np.array(1 / 600, np.float32), 'out': np.array(1 / 300, np.float32),
              'axes': np.array([2, 3], np.int64)}
    nodes = [helper.make_node('ReduceMean', ['input', 'axes'], ['pooled'], name='pool', keepdims=0),
             helper.make_node('MatMul', ['pooled', 'w'], ['mm'], name='matmul'),
             helper.make_node('Mul', ['mm', 'up'], ['mid'], name='scale_up1'),
             helper.make_node('Mul', ['mid', 'up'], ['big'], name='scale_up2'),
             helper.make_node('Mul', ['big', 'down'], ['a'], name='down_a'),
             helper.make_node('Mul', ['big', 'down'], ['b'], name='down_b'),
             helper.make_node('Add', ['a', 'b'], ['sum'], name='add'),
             helper.make_node('Mul', ['sum', 'out'], ['logits'], name='scale_out')]
    graph = helper.make_graph(
        nodes, 'range', [helper.make_tensor_value_info('input', TensorProto.FLOAT, ['batch', 3, 96, 96])],
        [helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['batch', 2])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)], ir_version=10)
    helper.set_model_props(model, {ONNX_METADATA_KEY: spec.onnx_metadata(model='range', precision='fp32')})
    onnx.save_model(model, str(path))
    return path


def test_fp16_keeps_out_of_range_tensors_in_fp32(tmp_path: Path) -> None:
    from onnxconverter_common import float16
    patches = np.random.default_rng(0).integers(0, 256, (8, 96, 96, 3), dtype=np.uint8)
    fp32 = _range_model(tmp_path / 'range.onnx')
    reference = OnnxRunner(fp32).logits(patches)
    assert np.abs(reference).max() > 0.5  # so that 'big' = 9e4 * mm exceeds 65504
    # A plain conversion overflows (seen once FP16 tensors are really rounded: plain onnxruntime CPU hides it) ...
    naive = float16.convert_float_to_float16(onnx.load_model(str(fp32)), keep_io_types=True)
    assert np.isfinite(OnnxRunner(naive).logits(patches)).all()
    assert not np.isfinite(OnnxRunner(fp16_emulation(naive)).logits(patches)).all()
    # ... the calibrated one keeps 'big', its producer and both consumers in FP32.
    record = convert_fp16(fp32, tmp_path / 'range.fp16.onnx', patches)
    assert set(record['fp32_nodes']) == {'scale_up2', 'down_a', 'down_b'}
    assert "'big' reaches" in record['fp32_nodes']['down_b'] and record['max_abs_activation'] > FP16_MAX
    assert record['fp16_round_trips_removed'] >= 2
    converted = OnnxRunner(fp16_emulation(onnx.load_model(str(tmp_path / 'range.fp16.onnx')))).logits(patches)
    np.testing.assert_allclose(converted, reference, rtol=5e-3, atol=5e-3)
    model = onnx.load_model(str(fp32))
    assert fp32_nodes(model, {'big': 1e5}) and not fp32_nodes(model, {'big': 1e3})


def test_bad_inputs_fail_clearly(trained: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model 'no_such_model'"):
        export_onnx.main(['--model', 'no_such_model', '--output', str(tmp_path)])
    with pytest.raises(ValueError, match='inception_resnet_v2_pcam'):  # checkpoint of another architecture
        export_onnx.main(['--model', 'inception_resnet_v2_pcam', '--checkpoint', str(trained.checkpoint),
                          '--model-kwargs', 'depths=(1,1,1)', '--output', str(tmp_path)])
    truncated = tmp_path / 'truncated.onnx'
    truncated.write_bytes(b'\x08\x07\x12\x04torch')
    with pytest.raises(ExportError, match='truncated.onnx'):
        check_onnx(truncated)
    with pytest.raises(FileNotFoundError, match='missing.onnx'):
        export_trt.main(['--from-onnx', str(tmp_path / 'missing.onnx'), '--output', str(tmp_path)])
    with pytest.raises(ValueError, match='min <= opt <= max'):
        export_trt.main(['--from-onnx', str(truncated), '--opt-batch', '512', '--output', str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['truncated.onnx']
