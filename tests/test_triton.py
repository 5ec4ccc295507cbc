"""Triton model repository: layout, configs parsed by Triton's own protobuf schema and checked against the model
files, TensorRT plans mapped per compute capability, and a client round trip against a KServe v2 stand-in."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from timm_inception_pcam.preprocess import preprocess_patches
from timm_inception_pcam.testing import blob_patches

pytest.importorskip('tritonclient.grpc', reason='tritonclient is a declared dependency (serve extra)')

from kserve_standin import KServeStandIn  # noqa: E402

from export.triton import (  # noqa: E402
    OUTPUT_NAME,
    TritonOptions,
    build_repository,
    model_config,
    validate_model_config,
)
from timm_inception_pcam.errors import ExportError, InferenceError, OutputExistsError, UsageError, cli  # noqa: E402


@pytest.fixture(scope='module')
def model() -> torch.nn.Module:
    from timm_inception_pcam.testing import train_tiny_model

    return train_tiny_model(*blob_patches(64, seed=0), steps=80)


@pytest.fixture(scope='module')
def repository(model, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp('triton') / 'repo'
    result = build_repository(model, root, model_name='tiny', checkpoint=None, formats=['onnx', 'openvino', 'tensorrt'],
                              parity_patches=(blob_patches(32, seed=5)[0], 'blob patches'))
    return root, result


def test_layout_and_configs_validate(repository) -> None:
    from tritonclient.grpc import model_config_pb2 as pb2

    root, result = repository
    assert result['models'] == {'tiny_onnx': 'onnx', 'tiny_openvino': 'openvino'}
    assert 'export.trt --fp16 --from-onnx' in result['skipped']['tiny_tensorrt']
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith('.')) == ['tiny_onnx', 'tiny_openvino']
    assert (root / 'tiny_onnx' / '1' / 'model.onnx').is_file()
    assert all((root / 'tiny_openvino' / '1' / f).is_file() for f in ('model.xml', 'model.bin'))
    for name, kind in (('tiny_onnx', 'onnxruntime_onnx'), ('tiny_openvino', 'openvino')):
        folder = root / name
        assert (folder / 'labels.txt').read_text() == 'normal\nmetastatic\n'
        config = validate_model_config((folder / 'config.pbtxt').read_text(), name)
        assert kind in (config.platform, config.backend) and config.max_batch_size == 256
        assert list(config.dynamic_batching.preferred_batch_size) == [64, 256]
        assert config.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU
        assert (config.input[0].name, pb2.DataType.Name(config.input[0].data_type), list(config.input[0].dims)) \
            == ('input', 'TYPE_UINT8', [96, 96, 3])
        assert (config.output[0].name, list(config.output[0].dims)) == (OUTPUT_NAME, [2])
    assert not [p for p in root.parent.iterdir() if p.name.endswith('.partial')]
    import stat

    umask = os.umask(0)
    os.umask(umask)
    for folder in (root, root / 'tiny_onnx', root / 'tiny_onnx' / '1'):  # the top folder was left 0700 (mkdtemp's)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, folder


def test_config_validation_catches_mistakes() -> None:
    good = model_config('m', 'onnx', 2, TritonOptions())
    io = {'inputs': {'input': ('uint8', [96, 96, 3])}, 'outputs': {OUTPUT_NAME: ('float32', [2])}}
    validate_model_config(good, 'm', io)
    with pytest.raises(ExportError, match='not a valid Triton model configuration'):
        validate_model_config(good.replace('max_batch_size', 'max_batch'), 'm')
    with pytest.raises(ExportError, match="declared outputs .* do not match the model file's"):
        validate_model_config(good, 'm', {**io, 'outputs': {'logits': ('float32', [2])}})
    with pytest.raises(ExportError, match='declared inputs'):
        validate_model_config(good, 'm', {**io, 'inputs': {'input': ('float32', [3, 96, 96])}})


def test_served_models_return_the_model_probabilities(repository, model) -> None:
    import onnxruntime as ort
    import openvino as ov

    root, _ = repository
    patches, _ = blob_patches(20, seed=3)
    with torch.inference_mode():
        expected = torch.softmax(model(torch.from_numpy(preprocess_patches(patches))), 1).numpy()
    assert expected[:, 1].std() > 0.05  # probabilities vary: the comparison means something
    onnx_out = ort.InferenceSession(str(root / 'tiny_onnx' / '1' / 'model.onnx')).run(None, {'input': patches})[0]
    np.testing.assert_allclose(onnx_out, expected, atol=1e-4)
    compiled = ov.Core().compile_model(str(root / 'tiny_openvino' / '1' / 'model.xml'), 'CPU',
                                       {'INFERENCE_PRECISION_HINT': 'f32'})
    np.testing.assert_allclose(compiled(patches)[0], expected, atol=1e-4)


@pytest.mark.parametrize('artefact, precision', [('tiny_onnx/1/model.onnx', 'auto'),
                                                 ('tiny_openvino/1/model.xml', 'fp32'),
                                                 ('tiny_openvino/1/model.xml', 'auto')])
def test_our_runners_run_the_served_models(repository, model, artefact: str, precision: str) -> None:
    """The served graphs return probabilities and take raw patches: the runners read that from the file (softmax was
    applied twice to the ONNX; the IR got a second normalisation and failed to compile)."""
    from timm_inception_pcam.inference import create_runner, probabilities

    root, _ = repository
    patches, _ = blob_patches(20, seed=3)
    with torch.inference_mode():
        expected = torch.softmax(model(torch.from_numpy(preprocess_patches(patches))), 1).numpy()
    runner = create_runner(root / artefact, precision=precision)
    np.testing.assert_allclose(probabilities(runner, patches), expected, atol=1e-4)


def test_served_files_are_checked_against_pytorch(repository, model, tmp_path: Path, monkeypatch) -> None:
    root, _ = repository
    for name in ('tiny_onnx', 'tiny_openvino'):
        parity = json.loads((root / name / 'sidecar.json').read_text())['parity']
        assert parity['n'] == 32 and parity['max_abs_prob_diff'] <= 1e-4 and parity['decision_agreement'] == 1.0
        assert parity['inputs'] == 'blob patches' and parity['prob_std_across_inputs'] > 0.05  # they vary
    import export.triton

    real = export.triton.torch_logits
    monkeypatch.setattr(export.triton, 'torch_logits', lambda *a, **k: real(*a, **k) * 1.5)  # another model
    with pytest.raises(ExportError, match=r"tiny_onnx: the served model's probabilities differ from PyTorch's by "):
        build_repository(model, tmp_path / 'repo', model_name='tiny', checkpoint=None, formats=['onnx'],
                         parity_patches=(blob_patches(32, seed=5)[0], 'blob patches'))
    assert not list(tmp_path.iterdir())


def test_parity_on_outputs_that_do_not_vary_is_flagged(repository, model, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """A model answering 0.5 to every patch passes any parity check: the sidecar and a warning say so."""
    import copy

    root, _ = repository
    assert json.loads((root / 'tiny_onnx' / 'sidecar.json').read_text())['parity']['outputs_vary'] is True
    constant = copy.deepcopy(model)
    with torch.no_grad():
        for p in constant.get_classifier().parameters():
            p.zero_()
    capsys.readouterr()
    build_repository(constant, tmp_path / 'repo', model_name='tiny', checkpoint=None, formats=['onnx'],
                     parity_patches=(blob_patches(32, seed=5)[0], 'blob patches'))
    parity = json.loads((tmp_path / 'repo' / 'tiny_onnx' / 'sidecar.json').read_text())['parity']
    assert parity['outputs_vary'] is False and parity['max_abs_prob_diff'] <= 1e-4
    assert 'warning: the probabilities barely vary across the parity patches (blob patches' in capsys.readouterr().err


def test_a_plan_built_from_the_serving_onnx_says_it_returns_probabilities(repository) -> None:
    from export.sidecar import Profile, make_sidecar
    from timm_inception_pcam.inference.onnx_runner import read_onnx_metadata

    root, _ = repository
    spec, _ = read_onnx_metadata(root / 'tiny_onnx' / '1' / 'model.onnx')
    data = make_sidecar(model='tiny', tensorrt_version='11.1.0', gpu={'name': 'GPU', 'compute_capability': '9.0'},
                        precision='fp16', spec=spec, profile=Profile(), checkpoint_sha256=None,
                        onnx_sha256='0' * 64, plan_sha256='0' * 64)
    assert data['output'] == {'name': OUTPUT_NAME, 'shape': [-1, 2], 'dtype': 'float32', 'activation': 'none'}
    assert json.loads((root / 'tiny_onnx' / 'sidecar.json').read_text())['output'] == data['output']


def test_tensorrt_plans_map_per_compute_capability(model, repository, tmp_path: Path, monkeypatch) -> None:
    from export.sidecar import Profile, make_sidecar, write_sidecar
    from export.spec import IOSpec
    from timm_inception_pcam.storage import file_sha256

    def plan(name: str, cc: str, output: str) -> Path:
        path = tmp_path / name
        path.write_bytes(f'fake plan for {cc}'.encode())
        write_sidecar(path, make_sidecar(
            model='tiny', tensorrt_version='11.1.0', gpu={'name': f'GPU {cc}', 'compute_capability': cc},
            precision='fp16', spec=IOSpec(baked_in=True, output_name=output, activation='none'), profile=Profile(),
            checkpoint_sha256=None, onnx_sha256='0' * 64, plan_sha256=file_sha256(path)))
        return path

    plans = [plan('a.plan', '9.0', OUTPUT_NAME), plan('b.plan', '8.9', OUTPUT_NAME)]
    out = tmp_path / 'repo'
    result = build_repository(model, out, model_name='tiny', checkpoint=None, formats=['tensorrt'], plans=plans)
    assert result['models'] == {'tiny_tensorrt': 'tensorrt'}
    config = validate_model_config((out / 'tiny_tensorrt' / 'config.pbtxt').read_text(), 'trt')
    assert config.platform == 'tensorrt_plan' and dict(config.cc_model_filenames) == {
        '8.9': 'model_sm89.plan', '9.0': 'model_sm90.plan'}
    assert (out / 'tiny_tensorrt' / '1' / 'model_sm90.plan').read_bytes() == b'fake plan for 9.0'
    assert not (out / 'tiny_onnx').exists()  # only the formats asked for
    with pytest.raises(OutputExistsError, match='pass --overwrite'):
        build_repository(model, out, model_name='tiny', checkpoint=None, formats=['tensorrt'], plans=plans)
    with pytest.raises(UsageError, match="built from another ONNX .*output 'logits'"):
        build_repository(model, tmp_path / 'r2', model_name='tiny', checkpoint=None, formats=['tensorrt'],
                         plans=[plan('c.plan', '9.0', 'logits')])
    plans[0].write_bytes(b'truncated')
    with pytest.raises(ExportError, match='does not match'):
        build_repository(model, out, model_name='tiny', checkpoint=None, formats=['tensorrt'], plans=plans,
                         overwrite=True)
    assert (out / 'tiny_tensorrt' / '1' / 'model_sm90.plan').read_bytes() == b'fake plan for 9.0'  # old one kept

    import export.triton
    bare = tmp_path / 'bare.plan'
    bare.write_bytes(b'a plan copied without its sidecar')
    monkeypatch.setattr(export.triton, '_serving_onnx', lambda *a, **k: pytest.fail('exported before the plans'))
    with pytest.raises(ExportError, match=r'bare\.plan: sidecar .* not found'):
        build_repository(model, tmp_path / 'r3', model_name='tiny', checkpoint=None, formats=['onnx', 'tensorrt'],
                         plans=[bare])
    assert not (tmp_path / 'r3').exists()


def test_tensorrt_without_a_plan_says_how_to_get_one(model, tmp_path: Path) -> None:
    out = tmp_path / 'repo'
    with pytest.raises(UsageError, match='--formats tensorrt without --plan: nothing to write'):
        build_repository(model, out, model_name='tiny', checkpoint=None, formats=['tensorrt'])
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(UsageError, match=r'a TensorRT plan is served only with tensorrt in --formats \(e\.g\. '
                                         r'--formats onnx,tensorrt\)'):  # it was ignored, exit 0
        build_repository(model, out, model_name='tiny', checkpoint=None, formats=['onnx'],
                         plans=[tmp_path / 'x.plan'])
    assert not out.exists() and not list(tmp_path.iterdir())
    result = build_repository(model, out, model_name='tiny', checkpoint=None, formats=['openvino', 'tensorrt'])
    assert result['models'] == {'tiny_openvino': 'openvino'} and not (out / 'tiny_onnx').exists()
    # the ONNX the plan is built from was not kept: the message asks for it rather than naming a missing file
    assert result['skipped']['tiny_tensorrt'].startswith(
        'no --plan given: rerun with --formats onnx,openvino,tensorrt for the serving ONNX, on the GPU machine run')


def test_client_round_trip_against_kserve_standin(repository, model, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    from timm_inception_pcam.serve_client import infer_patches, main

    root, _ = repository
    patches, _ = blob_patches(70, seed=4)
    with torch.inference_mode():
        expected = torch.softmax(model(torch.from_numpy(preprocess_patches(patches))), 1).numpy()
    with KServeStandIn(root) as server:
        probs = infer_patches(server.url, 'tiny_onnx', patches, batch_size=32)
        assert server.requests == 3  # 32 + 32 + 6
        np.testing.assert_allclose(probs, expected, atol=1e-4)
        with pytest.raises(InferenceError, match="model 'nope' is not ready"):
            infer_patches(server.url, 'nope', patches[:2])
        np.save(tmp_path / 'p.npy', patches[:3])
        printed = main(['--url', server.url, '--model', 'tiny_onnx', str(tmp_path / 'p.npy')])
        out = capsys.readouterr().out.splitlines()
        assert out[0] == 'index,normal,metastatic' and len(out) == 4
        np.testing.assert_allclose(printed, expected[:3], atol=1e-4)
        assert cli(main, 'serve_client', ['--url', server.url, '--model', 'tiny_onnx', str(tmp_path / 'x.npy')]) == 2
        assert 'x.npy: file not found' in capsys.readouterr().err


def test_patch_files_that_are_not_patches_are_named_once(tmp_path: Path) -> None:
    from timm_inception_pcam.errors import DataError
    from timm_inception_pcam.serve_client import read_patch_files

    np.save(tmp_path / 'f32.npy', np.zeros((2, 96, 96, 3), np.float32))
    with pytest.raises(DataError) as e:  # it named the file twice: 'f32.npy: not usable as PCam patches (/...f32.npy:'
        read_patch_files([tmp_path / 'f32.npy'])
    assert str(e.value) == f'{tmp_path / "f32.npy"}: expected dtype uint8 (0..255), got float32'
    (tmp_path / 'bad.npy').write_bytes(b'not numpy')
    with pytest.raises(DataError, match=r'bad\.npy: not usable as PCam patches \('):
        read_patch_files([tmp_path / 'bad.npy'])


def test_unreachable_server_is_one_line(tmp_path: Path) -> None:
    from timm_inception_pcam.serve_client import infer_patches


    with pytest.raises(InferenceError, match='127.0.0.1:9: cannot reach the server'):
        infer_patches('127.0.0.1:9', 'm', np.zeros((1, 96, 96, 3), np.uint8), timeout=2)


@pytest.mark.parametrize('url', ['http://localhost:8000', 'http://[bad', 'localhost:8000/v2', ' '])
def test_a_url_with_a_scheme_or_path_is_one_line(url: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import gc

    from timm_inception_pcam.serve_client import main

    np.save(tmp_path / 'p.npy', np.zeros((1, 96, 96, 3), np.uint8))
    assert cli(main, 'serve_client', ['--url', url, '--model', 'm', str(tmp_path / 'p.npy')]) == 2
    gc.collect()  # a half-built client's __del__ would print its traceback here
    err = capsys.readouterr().err
    assert f"--url {url!r}: expected HOST:PORT" in err and 'Traceback' not in err and len(err.strip().splitlines()) == 1


def test_an_ir_taking_raw_patches_without_our_metadata_is_one_line(repository, tmp_path: Path) -> None:
    import onnx
    import openvino as ov

    from timm_inception_pcam.inference import create_runner

    root, _ = repository
    proto = onnx.load_model(str(root / 'tiny_onnx' / '1' / 'model.onnx'))
    del proto.metadata_props[:]
    onnx.save_model(proto, str(tmp_path / 'foreign.onnx'))
    xml = tmp_path / 'foreign.xml'
    ov.save_model(ov.convert_model(str(tmp_path / 'foreign.onnx')), str(xml))
    with pytest.raises(InferenceError, match=r'foreign\.xml: the IR takes u8 \[\?,96,96,3\]; expected one float32 '
                                             r'input \(N, 3, 96, 96\)'):
        create_runner(xml, precision='fp32')


def test_a_float_ir_does_not_run_as_int8(repository) -> None:
    """backend openvino_int8 on a float IR ran it in float32 and reported int8."""
    from timm_inception_pcam.inference import create_runner

    root, _ = repository
    with pytest.raises(UsageError, match='a fp32 IR runs as fp32 or bf16, not int8'):
        create_runner(root / 'tiny_openvino' / '1' / 'model.xml', backend='openvino_int8')
