"""CUDA paths: the trainer's step (fp16 autocast + GradScaler, bf16; channels-last, EMA, clipping), the evaluator and
inference on CUDA, checkpoints saved from CUDA loaded on the CPU. Marked `cuda`; skipped with the reason without a
CUDA device. `python -m benchmarks.gpu_check` runs them (`pytest -m cuda`) on the GPU machine."""
import copy
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import timm_inception_pcam  # noqa: F401  (registers the models)
from timm_inception_pcam.checkpoint import load_model, save_checkpoint
from timm_inception_pcam.inference import create_runner
from timm_inception_pcam.inference.tta import view_probabilities

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f'needs a CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda or "none"})')]

DEVICE = torch.device('cuda')
TINY = {'depths': (1, 1, 1)}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model('inception_v4_pcam', num_classes=2, **TINY)


def _patches(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)


@pytest.mark.parametrize('precision', ['fp16', 'bf16'])
def test_trainer_step_on_cuda(precision: str) -> None:
    """The trainer's own step with its default recipe (clipping, EMA, channels-last) under fp16+GradScaler / bf16."""
    from timm.utils import NativeScaler

    from benchmarks.training import trainer_setup
    from timm_inception_pcam.train import train_one_epoch

    model = _model().to(DEVICE)
    args, optimizer, scheduler, ema, loss_fn = trainer_setup(model, 8, 4)
    assert args.channels_last and args.clip_grad > 0 and ema is not None
    model.to(memory_format=torch.channels_last)
    before = copy.deepcopy(model.state_dict())
    scaler = NativeScaler(device='cuda') if precision == 'fp16' else None
    dtype = torch.float16 if precision == 'fp16' else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 96, 96, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(4)]
    loss, updates = train_one_epoch(model, batches, optimizer, loss_fn, args, DEVICE, 0, 0, 4, scheduler=scheduler,
                                    ema=ema, scaler=scaler, amp_dtype=dtype, show=False)
    assert updates == 4 and np.isfinite(loss) and loss > 0
    params = dict(model.named_parameters())
    assert all(p.device.type == DEVICE.type and p.dtype == torch.float32 for p in params.values())
    assert all(bool(torch.isfinite(p).all()) for p in params.values())
    moved = [n for n, p in params.items() if not torch.equal(p.detach(), before[n])]
    assert len(moved) > len(params) // 2  # the optimizer updated the weights
    ema_params = dict(ema.module.named_parameters())
    assert all(p.device.type == DEVICE.type for p in ema_params.values())
    assert any(not torch.equal(ema_params[n], params[n]) for n in moved)  # the EMA lags the weights
    if scaler is not None:
        scale = scaler._scaler.get_scale()
        assert np.isfinite(scale) and scale > 0


def test_evaluator_and_inference_on_cuda_match_cpu() -> None:
    model = _model().eval()
    patches = _patches(20)

    def probs(device: str, precision: str = 'auto') -> np.ndarray:
        runner = create_runner(copy.deepcopy(model), 'eager', device, precision, batch_size=8)
        return view_probabilities(runner, patches, batch_size=8, tta=1, progress=False)[0]

    cpu, cuda = probs('cpu'), probs(str(DEVICE))
    np.testing.assert_allclose(cuda, cpu, atol=2e-3)  # cuDNN may use TF32 for float32 convolutions
    fp16 = probs(str(DEVICE), 'fp16')
    assert fp16.shape == (20,) and np.isfinite(fp16).all()
    np.testing.assert_allclose(fp16, cpu, atol=2e-2)
    runner = create_runner(copy.deepcopy(model), 'eager', str(DEVICE), 'bf16', batch_size=8)
    assert runner.spec.device.startswith('cuda') and runner.spec.precision == 'bf16'
    logits = runner.logits(patches[:5])
    assert logits.dtype == np.float32 and logits.shape == (5, 2) and np.isfinite(logits).all()


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_checkpoint_saved_on_cuda_loads_on_cpu(tmp_path: Path, suffix: str) -> None:
    model = _model().to(DEVICE).eval()
    path = save_checkpoint(tmp_path / f'model{suffix}', model, arch='inception_v4_pcam', model_kwargs=TINY)
    loaded = load_model(None, path)
    params = dict(loaded.named_parameters())
    assert all(p.device.type == 'cpu' for p in params.values())
    for name, p in model.named_parameters():
        assert torch.equal(params[name], p.detach().cpu()), name
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x.to(DEVICE)).cpu(), atol=2e-3, rtol=1e-3)
