"""Our trainer (`python -m timm_inception_pcam.train`) and the checkpoints of timm's own train.py.

The learning proof (reduced-depth Inception-v4 on synthetic PCam beats a centre-blind baseline and reaches
ROC AUC >= 0.95) lives in test_train_learns.py; this file stays fast.
"""
import argparse
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from timm_inception_pcam.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint
from timm_inception_pcam.constants import LABEL_NAMES
from timm_inception_pcam.errors import OutputError, PCamError
from timm_inception_pcam.train import (
    BEST_NAME,
    LAST_NAME,
    LOG_CSV,
    LOG_JSON,
    TrainConfig,
    TrainError,
    TrainResult,
    capture_rng_state,
    cli,
    config_from_args,
    main,
    restore_rng_state,
    train,
)

TINY = ['--model-kwargs', 'depths=1,1,1']
EPOCHS = ['--epochs', '2']
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def pcam_dir(tmp_path_factory) -> Path:
    from timm_inception_pcam.data import synthesize_pcam

    root = tmp_path_factory.mktemp('pcam')
    synthesize_pcam(root, 48, seed=3, n_valid=24, n_test=8)
    return root


@pytest.fixture(scope='module')
def finished_run(pcam_dir, tmp_path_factory) -> TrainResult:
    """One finished 2-epoch run (with EMA), shared by the tests that only read its files: the typed core, called
    with the configuration `quick_args` spells on the command line."""
    return train(quick_config(pcam_dir, tmp_path_factory.mktemp('run') / 'run', epochs=2))


def quick_args(data: Path, out: Path, *extra: str) -> list[str]:
    """A run of seconds: 2 updates of 8 patches per epoch, 16 validation patches, no worker processes."""
    return ['--data-dir', str(data), '--output', str(out), '--model', 'inception_v4_pcam', *TINY,
            '--no-pretrained', '-b', '8', '--steps-per-epoch', '2', '--limit-val', '16', '--workers', '0',
            '--warmup-epochs', '0', '--no-progress', '--amp-dtype', 'float32', *extra]


def quick_config(data: Path, out: Path, **over) -> TrainConfig:
    """`quick_args` as a TrainConfig."""
    return TrainConfig(data_dir=data, output=out, model='inception_v4_pcam', model_kwargs={'depths': (1, 1, 1)},
                       pretrained=False, batch_size=8, steps_per_epoch=2, limit_val=16, workers=0, warmup_epochs=0,
                       progress=False, precision='fp32', **over)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=str(REPO))
    env.setdefault('OMP_NUM_THREADS', '2')
    return env


# ----------------------------------------------------------------------------------------------- helpers


def test_native_bf16_is_amx_or_avx512_bf16(monkeypatch) -> None:
    """bf16 counts as native with AMX tiles or AVX-512 BF16 (AMD Zen 4), from torch's probes or /proc/cpuinfo."""
    import timm_inception_pcam.device as device

    for amx, avx in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda a=amx: a, raising=False)
        monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda v=avx: v, raising=False)
        assert (device.cpu_has_amx(), device.cpu_has_avx512_bf16(), device.cpu_has_native_bf16()) == \
            (amx, avx, amx or avx)
    monkeypatch.delattr(torch.cpu, '_is_amx_tile_supported')
    monkeypatch.delattr(torch.cpu, '_is_avx512_bf16_supported')
    monkeypatch.setattr(device, '_cpuinfo_flags', lambda: {'avx512f', 'avx512_bf16', 'avx512_vnni'})
    assert not device.cpu_has_amx() and device.cpu_has_native_bf16()
    monkeypatch.setattr(device, '_cpuinfo_flags', lambda: {'avx512f', 'avx2'})
    assert not device.cpu_has_native_bf16()


def test_amp_dtype_policy(monkeypatch) -> None:
    """--amp-dtype goes through precision.py: auto is bf16 on CPUs with native bf16 (AMX, AVX-512 BF16), fp32 (no
    autocast) on others."""
    import timm_inception_pcam.precision as precision
    from timm_inception_pcam.precision import autocast_dtype, choose_precision

    cpu = torch.device('cpu')
    monkeypatch.setattr(precision, 'cpu_has_native_bf16', lambda: True)
    assert autocast_dtype(choose_precision(cpu)) == torch.bfloat16
    monkeypatch.setattr(precision, 'cpu_has_native_bf16', lambda: False)
    assert autocast_dtype(choose_precision(cpu)) is None
    assert autocast_dtype(choose_precision(cpu, 'float32')) is None
    assert autocast_dtype(choose_precision(cpu, 'float16')) == torch.float16


def test_amp_dtype_old_spellings_are_recorded_canonical(tmp_path) -> None:
    for spelling, canonical in (('float32', 'fp32'), ('bfloat16', 'bf16'), ('float16', 'fp16'), ('fp16', 'fp16'),
                                ('auto', 'auto')):
        cfg = config_from_args(['--data-dir', str(tmp_path), '--amp-dtype', spelling])
        assert cfg.precision == canonical and cfg.record()['precision'] == canonical


def test_command_line_and_config_are_the_same_run(pcam_dir, tmp_path) -> None:
    """main(argv) only parses: the quick command line is exactly the quick TrainConfig."""
    assert config_from_args(quick_args(pcam_dir, tmp_path / 'x', '--epochs', '2')) == quick_config(
        pcam_dir, tmp_path / 'x', epochs=2)
    defaults = TrainConfig(data_dir=pcam_dir)
    assert config_from_args(['--data-dir', str(pcam_dir)]) == defaults
    assert defaults.epochs == 10 and defaults.lr == 1e-3 and defaults.model_ema and defaults.precision == 'auto'


def test_rng_states_round_trip_through_weights_only_file(tmp_path) -> None:
    import random

    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.normal()  # leaves a cached gaussian in NumPy's legacy state
    state = capture_rng_state()
    torch.save({'rng': state}, tmp_path / 'rng.pth')
    first = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    restore_rng_state(torch.load(tmp_path / 'rng.pth', weights_only=True)['rng'])
    again = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert first[2:] == again[2:]


# ----------------------------------------------------------------------------------------------- a run and its files


def test_run_writes_checkpoints_logs_and_summary(finished_run) -> None:
    summary = finished_run
    out = summary.output
    assert [row['epoch'] for row in summary.history] == [0, 1]
    assert summary.last_checkpoint == out / LAST_NAME
    assert (out / LOG_CSV).read_text().splitlines()[0].startswith('epoch,')
    assert len((out / LOG_CSV).read_text().splitlines()) == 3
    assert [row['epoch'] for row in json.loads((out / LOG_JSON).read_text())] == [0, 1]
    last = read_checkpoint(out / LAST_NAME)
    assert last['epoch'] == 1 and last['num_updates'] == 4
    assert last['arch'] == 'inception_v4_pcam' and tuple(last['model_kwargs']['depths']) == (1, 1, 1)
    assert {'optimizer', 'scheduler', 'state_dict_ema', 'rng_states'} <= set(last)
    # The best checkpoint holds the weights that scored best_metric, and the evaluator's loader reads it.
    best = read_checkpoint(summary.best_checkpoint)
    assert best['weights'] in ('model', 'ema')
    assert best['best_metric'] == pytest.approx(summary.best_metric)
    row = summary.history[best['epoch']]
    scored = row['val_roc_auc'] if best['weights'] == 'model' else row['ema_val_roc_auc']
    assert scored == pytest.approx(summary.best_metric)
    if best['epoch'] == 1:  # the best weights are the final model's or EMA's
        final = last['state_dict_ema'] if best['weights'] == 'ema' else last['state_dict']
        assert all(torch.equal(best['state_dict'][k], v) for k, v in final.items())
    model = load_model(None, summary.best_checkpoint)
    assert model.num_classes == 2
    assert len(model.features) == 11  # stem (6 blocks), 1 x A, reduction A, 1 x B, reduction B, 1 x C


def test_rmsproptf_paper_recipe_and_epoch_schedule(pcam_dir, tmp_path) -> None:
    """The Inception-v4 paper's optimiser: RMSProp decay 0.9, epsilon 1.0, lr 0.045 x 0.94 every 2 epochs."""
    out = tmp_path / 'rms'
    summary = main(quick_args(pcam_dir, out, '--epochs', '1', '--opt', 'rmsproptf', '--opt-eps', '1.0',
                              '--lr', '0.045', '--sched', 'step', '--decay-epochs', '1', '--decay-rate', '0.94',
                              '--no-sched-on-updates', '--weight-decay', '4e-5', '--no-model-ema'))
    groups = read_checkpoint(out / LAST_NAME)['optimizer']['param_groups']
    assert groups[0]['alpha'] == 0.9 and groups[0]['eps'] == 1.0
    assert groups[0]['momentum'] == 0.9
    assert sorted(g['weight_decay'] for g in groups) == [0.0, 4e-5]  # none on biases and norms
    assert summary.history[0]['lr'] == pytest.approx(0.045)  # the rate epoch 0 ran at (it logged the next one)
    assert groups[0]['lr'] == pytest.approx(0.045 * 0.94)  # stepped once, after epoch 0


# ----------------------------------------------------------------------------------------------- resume after a kill


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f'training exited ({proc.returncode}) before writing {path}:\n{out}\n{err}')
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f'no {path} after {timeout:.0f} s')
        time.sleep(0.02)


def test_resume_after_sigkill_matches_uninterrupted_run(pcam_dir, finished_run, tmp_path) -> None:
    """Kill a run right after its first checkpoint, resume it, and end where the uninterrupted run ended."""
    # Default --pretrained: offline, the run must say it falls back to random init (the same init) and go on.
    args = [a for a in quick_args(pcam_dir, tmp_path / 'killed', *EPOCHS) if a != '--no-pretrained']
    proc = subprocess.Popen([sys.executable, '-m', 'timm_inception_pcam.train', *args], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # log.csv is the epoch's last write (a SIGKILL in the middle of a write leaves its temporary file behind)
    _wait_for(tmp_path / 'killed' / LOG_CSV, proc)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert 'notice: pretrained weights for inception_v4_pcam are not available' in err  # logging goes to stderr
    interrupted = read_checkpoint(tmp_path / 'killed' / LAST_NAME)
    assert interrupted['epoch'] == 0, 'the kill came after the first checkpoint, before the second'
    assert not list((tmp_path / 'killed').glob('.*partial*')), 'a partial file was left behind'

    resumed = main([*quick_args(pcam_dir, tmp_path / 'killed', *EPOCHS),
                    '--resume', str(tmp_path / 'killed' / LAST_NAME)])
    straight = finished_run

    assert [row['epoch'] for row in resumed.history] == [0, 1]
    for a, b in zip(resumed.history, straight.history):
        for key in ('updates', 'lr', 'train_loss', 'val_roc_auc', 'val_nll', 'ema_val_nll'):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a['epoch'], key)
    end_r, end_s = read_checkpoint(resumed.last_checkpoint), read_checkpoint(straight.last_checkpoint)
    for key in ('state_dict', 'state_dict_ema'):
        for name, tensor in end_s[key].items():
            assert torch.allclose(end_r[key][name].float(), tensor.float(), rtol=1e-4, atol=1e-6), (key, name)
    moments = end_s['optimizer']['state']
    for idx, state in moments.items():
        assert torch.allclose(end_r['optimizer']['state'][idx]['exp_avg'], state['exp_avg'], rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------------- bad input


def test_refuses_unknown_model(pcam_dir, tmp_path) -> None:
    with pytest.raises(TrainError, match=r"--model 'inception_v5_pcam': not a registered.*inception_v4_pcam"):
        main(quick_args(pcam_dir, tmp_path / 'x', '--model', 'inception_v5_pcam'))


def test_refuses_missing_data_dir_and_split(pcam_dir, tmp_path) -> None:
    with pytest.raises(TrainError, match='no such folder'):
        main(quick_args(tmp_path / 'nowhere', tmp_path / 'x'))
    with pytest.raises(ValueError, match="unknown PCam split 'testing'"):
        main(quick_args(pcam_dir, tmp_path / 'y', '--val-split', 'testing'))
    only_train = tmp_path / 'only_train'
    only_train.mkdir()
    for f in pcam_dir.glob('*_train_*'):
        (only_train / f.name).symlink_to(f)
    with pytest.raises(FileNotFoundError, match='camelyonpatch_level_2_split_valid_'):
        main(quick_args(only_train, tmp_path / 'z'))
    assert not (tmp_path / 'z').exists(), 'nothing is written when the data are missing'


def test_refuses_to_overwrite_a_run_and_bad_resumes(pcam_dir, finished_run, tmp_path) -> None:
    out = finished_run.output
    before = (out / LAST_NAME).stat().st_mtime_ns
    with pytest.raises(OutputError, match=r'already holds a run.*--resume .*last.pth to continue it, --overwrite to '
                                          'replace it'):
        main(quick_args(pcam_dir, out, '--epochs', '2'))
    with pytest.raises(TrainError, match=r'built with --model-kwargs .*depths.*not'):
        main(quick_args(pcam_dir, out, '--epochs', '2', '--resume', str(out / LAST_NAME), '--model-kwargs',
                        'depths=1,2,1'))
    with pytest.raises(TrainError, match='checkpoint has 2 classes, --num-classes is 3'):
        main(quick_args(pcam_dir, out, '--resume', str(out / LAST_NAME), '--num-classes', '3'))
    with pytest.raises(TrainError, match='not a training state'):
        main(quick_args(pcam_dir, out, '--resume', str(out / BEST_NAME)))
    # --resume alone: the same answer (it said "pass --data-dir and the run's other options", then refused them)
    with pytest.raises(TrainError, match=r"not a training state .*the run's last.pth\); use --initial-checkpoint"):
        config_from_args(['--resume', str(out / BEST_NAME)])
    afile = tmp_path / 'data.h5'
    afile.write_text('x')
    with pytest.raises(TrainError, match='data.h5: a file, not a folder'):
        main(quick_args(afile, tmp_path / 'e'))
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes((out / LAST_NAME).read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r'corrupt.pth: .* \(OSError: \[Errno 22\] Invalid argument\)$'):
        main(quick_args(pcam_dir, tmp_path / 'c', '--resume', str(corrupt)))
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'\x80\x02garbage, not a pickle of tensors')
    with pytest.raises(CheckpointError, match=r'garbage.pth: .* \(UnpicklingError: [^()]+\)$') as info:
        main(quick_args(pcam_dir, tmp_path / 'c', '--resume', str(garbage)))
    assert 'weights_only' not in str(info.value)  # torch's advice to load unsafely is not passed on
    with pytest.raises(TrainError, match='trained with EMA|without EMA'):
        main(quick_args(pcam_dir, tmp_path / 'd', '--resume', str(out / LAST_NAME), '--no-model-ema'))
    assert (out / LAST_NAME).stat().st_mtime_ns == before, 'a refused run must not touch the files'
    files = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(TrainError, match='no such folder'):  # fails after --overwrite took the folder
        main(quick_args(tmp_path / 'nowhere', out, '--overwrite'))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == files, 'the replaced run is back as it was'


def test_cli_prints_a_clear_error(pcam_dir, tmp_path, capsys) -> None:
    assert cli(quick_args(pcam_dir, tmp_path / 'x', '--opt', 'rmsprop-tf')) == 2
    err = capsys.readouterr().err
    assert err.startswith('train: error: --opt ') and 'rmsproptf' in err


def test_initial_checkpoint_of_another_architecture_is_refused(pcam_dir, tmp_path) -> None:
    other = timm.create_model('inception_resnet_v2_pcam', depths=(1, 1, 1))
    save_checkpoint(tmp_path / 'irv2.pth', other, arch='inception_resnet_v2_pcam', model_kwargs={'depths': [1, 1, 1]})
    with pytest.raises(TrainError, match="weights of 'inception_resnet_v2_pcam' do not fit inception_v4_pcam"):
        main(quick_args(pcam_dir, tmp_path / 'x', '--initial-checkpoint', str(tmp_path / 'irv2.pth')))


# ----------------------------------------------------------------------------------------------- timm's train.py


def test_create_model_with_train_py_defaults_and_initial_checkpoint(finished_run) -> None:
    """train.py's create_model call with its argparse defaults, and `--initial-checkpoint` = our best checkpoint."""
    summary = finished_run
    ours = load_model(None, summary.best_checkpoint)
    call = dict(pretrained=False, in_chans=3, num_classes=None, drop_rate=0.0, drop_path_rate=None,
                drop_block_rate=None, global_pool=None, bn_momentum=None, bn_eps=None, scriptable=False)
    fresh = timm.create_model('inception_v4_pcam', checkpoint_path='', depths=(1, 1, 1), **call)
    assert fresh.num_classes == 2
    loaded = timm.create_model('inception_v4_pcam', checkpoint_path=str(summary.best_checkpoint), depths=(1, 1, 1),
                               **call).eval()
    x = torch.randn(4, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(loaded(x), ours(x))
        assert not torch.allclose(fresh.eval()(x), ours(x))


def test_checkpoint_saver_format_loads_through_load_model(tmp_path) -> None:
    """The file timm's CheckpointSaver writes (epoch, arch, state_dict, optimizer, version, args as a Namespace,
    metric, state_dict_ema) loads weights-only into the evaluator's model, plain or EMA weights."""
    from timm.utils import CheckpointSaver, ModelEmaV3

    model = timm.create_model('inception_v4_pcam', num_classes=2, depths=(1, 1, 1))
    ema = ModelEmaV3(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.train()  # warm the BN statistics: a fresh Inception gives nearly constant logits
        for _ in range(3):
            model(torch.randn(8, 3, 96, 96))
    args = argparse.Namespace(model='inception_v4_pcam', model_kwargs={'depths': (1, 1, 1)}, num_classes=2,
                              lr=0.01, output=str(tmp_path))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(tmp_path),
                            recovery_dir=str(tmp_path), max_history=1)
    saver.save_checkpoint(epoch=3, metric=0.9)
    path = tmp_path / 'model_best.pth.tar'
    with pytest.raises(Exception, match='Namespace|weights_only|Unsupported global'):
        torch.load(path, weights_only=True)  # a plain weights-only load refuses the Namespace ...
    ckpt = read_checkpoint(path)  # ... read_checkpoint allows exactly that one class
    assert {'epoch', 'arch', 'state_dict', 'optimizer', 'version', 'args', 'metric', 'state_dict_ema'} <= set(ckpt)
    x = torch.randn(4, 3, 96, 96) * torch.tensor([0.5, 1.0, 2.0, 3.0]).view(4, 1, 1, 1) + torch.linspace(-1, 1, 4).view(
        4, 1, 1, 1)  # inputs unlike each other
    loaded = load_model(None, path)  # arch and model_kwargs come from args
    loaded_ema = load_model(None, path, use_ema=True)
    with torch.no_grad():
        want = model.eval()(x)
        assert torch.allclose(loaded(x), want, atol=1e-6)
        assert torch.allclose(loaded_ema(x), ema.module(x), atol=1e-6)
        margin = want[:, 1] - want[:, 0]
        assert margin.std() > 1e-3, 'outputs must vary between inputs for the comparison to mean anything'
        assert not torch.allclose(loaded_ema(x), want, atol=1e-4)


@pytest.mark.slow
def test_timm_train_py_runs_our_model_on_converted_folder(tmp_path) -> None:
    """The unmodified train.py of a pytorch-image-models checkout, on the ImageFolder tree `data convert` writes."""
    scripts = os.environ.get('TIMM_SCRIPTS_DIR')
    if not scripts or not (Path(scripts) / 'train.py').is_file():
        pytest.skip('set TIMM_SCRIPTS_DIR to a pytorch-image-models checkout (train.py is not in the timm wheel)')
    from timm_inception_pcam.data import synthesize_pcam

    synthesize_pcam(tmp_path / 'h5', 32, seed=5, n_valid=16, n_test=4)
    env = subprocess_env()
    subprocess.run([sys.executable, '-m', 'timm_inception_pcam.data', 'convert', '--data-dir', str(tmp_path / 'h5'),
                    '--output', str(tmp_path / 'folder')], check=True, env=env, capture_output=True, text=True)
    # ImageFolder numbers classes in sorted folder order: it must give normal = 0, metastatic = 1.
    classes = sorted(p.name for p in (tmp_path / 'folder' / 'train').iterdir() if p.is_dir())
    assert [LABEL_NAMES[i] in name for i, name in enumerate(classes)] == [True, True], classes
    run = subprocess.run(
        [sys.executable, str(Path(scripts) / 'train.py'), '--device-modules', 'timm_inception_pcam',
         '--data-dir', str(tmp_path / 'folder'), '--model', 'inception_v4_pcam', '--model-kwargs', 'depths=1,1,1',
         '--num-classes', '2', '--device', 'cpu', '--epochs', '1', '-b', '8', '--workers', '0', '--no-prefetcher',
         '--scale', '1.0', '1.0', '--ratio', '1.0', '1.0', '--hflip', '0.5', '--vflip', '0.5', '--smoothing', '0.1',
         '--opt', 'adamw', '--lr', '1e-3', '--warmup-epochs', '0', '--model-ema', '--eval-metric', 'top1',
         '--output', str(tmp_path / 'out'), '--experiment', 'tiny'],
        env=env, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    best = tmp_path / 'out' / 'tiny' / 'model_best.pth.tar'
    model = load_model(None, best)
    assert model.num_classes == 2
    with torch.no_grad():
        assert model(torch.randn(2, 3, 96, 96)).shape == (2, 2)


@pytest.mark.slow
def test_ddp_two_cpu_processes_with_gloo(pcam_dir, tmp_path) -> None:
    """torchrun with 2 processes on CPU: gloo process group, DistributedSampler shards, gathered validation."""
    out = tmp_path / 'ddp'
    env = dict(subprocess_env(), OMP_NUM_THREADS='1')
    run = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2',
                          '-m', 'timm_inception_pcam.train', *quick_args(pcam_dir, out, '--epochs', '1', '-b', '4')],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert '2 process(es)' in run.stderr  # the trainer logs to stderr
    last = read_checkpoint(out / LAST_NAME)
    assert last['num_updates'] == 2 and len(last['rng_states']) == 2
    assert not torch.equal(last['rng_states'][0]['torch'], last['rng_states'][1]['torch'])
    assert last['history'][0]['val_n'] == 16  # both shards of the validation subset were gathered
    assert not any(k.startswith('module.') for k in last['state_dict'])


# ----------------------------------------------------------------------------------------------- user errors: exit 2


def _exit_2_one_line(capsys, argv: list[str], *needles: str) -> str:
    assert cli(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith('train: error: ')]
    assert len(lines) == 1 and 'Traceback' not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize('extra, needles', [
    (('--epochs', '0'), ('--epochs must be >= 1, got 0',)),
    (('-b', '0'), ('--batch-size must be >= 1, got 0',)),
    (('--workers', '-1'), ('--workers must be >= 0 and <= 256, got -1',)),
    (('--lr', '0'), ('--lr must be > 0, got 0.0',)),
    (('--lr', '-0.1'), ('--lr must be > 0',)),
    (('--limit-val', '0'), ('--limit-val must be >= 1',)),
    (('--smoothing', '1.5'), ('--smoothing must be >= 0 and <= 1',)),
    (('--opt', 'rmsprop-tf'), ('--opt ', 'rmsproptf')),
    (('--model', 'inception_v5_pcam'), ('not a registered timm model',)),
    (('--lr', 'inf'), ('--lr must be a finite number, got inf',)),
    (('--sched', 'nosuch'), ("--sched nosuch: Unknown scheduler 'nosuch'",)),
    (('--device', 'bogus'), ("--device 'bogus': expected cpu, cuda or cuda:N",)),
    # tracebacks before: an unknown tag, a step schedule of period 0, one beta for adam, an empty argument name
    (('--model', 'inception_v4_pcam.nosuch'), ("inception_v4_pcam has no pretrained tag 'nosuch' (its tags: ",)),
    (('--model', 'inception_v4_pcam.nosuch', '--pretrained'), ("inception_v4_pcam has no pretrained tag 'nosuch'",)),
    (('--sched', 'step', '--decay-epochs', '0'), ('--decay-epochs must be > 0',)),
    (('--opt', 'adam', '--opt-betas', '0.9'), ('--opt adam --opt-betas 0.9: adam takes 2 betas (default 0.9 0.999)',)),
    (('--opt', 'lamb', '--opt-betas', '0.9'), ('lamb takes 2 betas',)),  # a traceback at its first step
    (('--opt', 'adamw', '--opt-betas', '0.9', '0.99', '0.5'), ('adamw takes 2 betas', 'got 3')),  # taken silently
    # accepted silently before: a negative lr, a rising schedule, a string 'false' (true), a second class count
    (('--decay-rate', '-1'), ('--decay-rate must be > 0 and <= 1',)),
    (('--min-lr', '0.1', '--lr', '0.001'), ('--min-lr 0.1 is above --lr 0.001',)),
    (('--model-kwargs', 'num_classes=3'), ('the class count is --num-classes',)),
])
def test_bad_values_exit_2_with_one_line(pcam_dir, tmp_path, capsys, extra, needles) -> None:
    _exit_2_one_line(capsys, quick_args(pcam_dir, tmp_path / 'x', *extra), *needles)
    assert not (tmp_path / 'x').exists(), 'a refused run leaves no folder behind'


@pytest.mark.parametrize('words, message', [
    (['=1'], "--model-kwargs '=1': expected KEY=VALUE"),  # a TypeError traceback before
    (['stem_stride=1', 'aux_logits=false'], "--model-kwargs 'aux_logits=false': values are Python literals: write "
                                            "aux_logits=False"),  # the string 'false' built the heads
])
def test_model_kwargs_words_are_refused_by_the_parser(words, message, pcam_dir, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        config_from_args(['--data-dir', str(pcam_dir), '--output', str(tmp_path / 'x'), '--model-kwargs', *words])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_output_naming_a_file_and_missing_data_exit_2(pcam_dir, tmp_path, capsys) -> None:
    afile = tmp_path / 'afile'
    afile.write_text('not a folder')
    _exit_2_one_line(capsys, quick_args(pcam_dir, afile), f'--output {afile} is an existing file; expected a folder')
    assert afile.read_text() == 'not a folder'
    _exit_2_one_line(capsys, quick_args(tmp_path / 'nowhere', tmp_path / 'y'), 'no such folder')
    _exit_2_one_line(capsys, quick_args(pcam_dir, tmp_path / 'z', '--resume', str(tmp_path / 'no.pth')),
                     'no such file')
    _exit_2_one_line(capsys, quick_args(pcam_dir, tmp_path / 'z', '--resume', str(tmp_path)),
                     'a folder, expected a checkpoint file')


@pytest.mark.parametrize('pretrained', [True, False])
def test_model_argument_the_model_does_not_take(pcam_dir, tmp_path, capsys, pretrained) -> None:
    """A bad --model-kwargs is one line whether the run starts from pretrained weights (a traceback before) or not."""
    argv = [a for a in quick_args(pcam_dir, tmp_path / 'x', '--model-kwargs', 'foo=1')
            if pretrained is False or a != '--no-pretrained']
    _exit_2_one_line(capsys, argv, "model argument foo=1: inception_v4_pcam does not take 'foo'")
    assert not (tmp_path / 'x').exists()


def test_cuda_without_a_gpu_is_one_line(pcam_dir, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    _exit_2_one_line(capsys, quick_args(pcam_dir, tmp_path / 'x', '--device', 'cuda'),
                     '--device cuda: no usable CUDA GPU on this machine')
    assert not (tmp_path / 'x').exists()


def test_command_exits_2_without_traceback(pcam_dir, tmp_path) -> None:
    """The real entry point (`python -m timm_inception_pcam.train`) goes through errors.cli."""
    run = subprocess.run([sys.executable, '-m', 'timm_inception_pcam.train',
                          *quick_args(pcam_dir, tmp_path / 'x', '--epochs', '0')],
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ['train: error: --epochs must be >= 1, got 0'], run.stderr


def test_diverging_lr_says_lower_lr(pcam_dir, tmp_path, capsys) -> None:
    """A huge --lr ends in the promised advice, not in a metric's complaint about NaN probabilities."""
    line = _exit_2_one_line(capsys, quick_args(pcam_dir, tmp_path / 'x', '--lr', '1e6', '--epochs', '1'),
                            'training diverged', 'lower --lr')
    assert 'probs must lie' not in line
    assert not (tmp_path / 'x' / LAST_NAME).exists(), 'no checkpoint of diverged weights'


def test_dataloader_worker_failure_is_one_line(pcam_dir, tmp_path, capsys, monkeypatch) -> None:
    """A user error raised inside a DataLoader worker: one line with its own message, not the worker's traceback."""
    from timm_inception_pcam.data import PCamDataset
    from timm_inception_pcam.errors import DataError

    def broken(self, indices):
        raise DataError(f'{self.x_path}: chunk at index {indices[0]} is corrupt (expected gzip data)')

    monkeypatch.setattr(PCamDataset, '__getitems__', broken)  # inherited by the forked worker
    line = _exit_2_one_line(capsys, quick_args(pcam_dir, tmp_path / 'x', '--workers', '1', '--epochs', '1'),
                            'is corrupt (expected gzip data) (in a DataLoader worker)')
    assert 'Original Traceback' not in line and 'File "' not in line


# ----------------------------------------------------------------------------------------------- one run per folder


def test_claim_output_dir_locks_and_refuses(tmp_path) -> None:
    from timm_inception_pcam.storage import LOCK_NAME, claim_output_dir

    out = tmp_path / 'run'
    with claim_output_dir(out) as folder:
        assert (folder / LOCK_NAME).read_text().split()[0] == str(os.getpid())
        with pytest.raises(OutputError, match=rf'in use by another run \(pid {os.getpid()}'):
            with claim_output_dir(out):
                pass
        (folder / 'last.pth').write_bytes(b'x')
        (folder / 'keep.txt').write_text('mine')
    assert not (out / LOCK_NAME).exists(), 'the lock goes with the run'
    with pytest.raises(OutputError, match=r'already holds a run \(last.pth\): pass --resume R to continue it, '
                                          r'--overwrite to replace it, or choose another --output'):
        with claim_output_dir(out, finished=('last.pth',), resume_hint='--resume R to continue it'):
            pass
    with claim_output_dir(out, resume=True, finished=('last.pth',)):
        assert (out / 'last.pth').exists()
    with claim_output_dir(out, overwrite=True, finished=('last.pth',), replaces=('last.pth',)):
        assert not (out / 'last.pth').exists() and (out / 'keep.txt').read_text() == 'mine'  # only what it names
    empty = tmp_path / 'never-written'
    with claim_output_dir(empty):
        pass
    assert not empty.exists(), 'a folder created for nothing is removed'


def test_overwrite_keeps_the_previous_run_until_the_new_one_replaces_it(tmp_path) -> None:
    from timm_inception_pcam.storage import ASIDE_NAME, claim_output_dir

    out = tmp_path / 'run'
    out.mkdir()
    (out / 'last.pth').write_bytes(b'old weights')
    (out / 'log.csv').write_text('old log')
    (out / 'keep.txt').write_text('mine')
    claim = functools.partial(claim_output_dir, out, overwrite=True, finished=('last.pth',),
                              replaces=('last.pth', 'log.csv'))
    with pytest.raises(OSError, match='bad data'), claim():
        assert not (out / 'last.pth').exists() and not (out / 'log.csv').exists()  # out of the new run's way
        (out / 'log.csv').write_text('new log, no epoch finished')
        raise OSError('bad data')
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert files == {'last.pth': b'old weights', 'log.csv': b'old log', 'keep.txt': b'mine'}  # all back

    with pytest.raises(KeyboardInterrupt), claim():  # an epoch finished: the new run is the one to continue
        (out / 'last.pth').write_bytes(b'new weights')
        raise KeyboardInterrupt
    assert (out / 'last.pth').read_bytes() == b'new weights' and not (out / 'log.csv').exists()
    assert not (out / ASIDE_NAME).exists()

    (out / ASIDE_NAME).mkdir()  # a replacing run killed before its first checkpoint
    os.replace(out / 'last.pth', out / ASIDE_NAME / 'last.pth')
    (out / 'log.csv').write_text('the killed run\'s log')
    with claim_output_dir(out, resume=True, finished=('last.pth',), replaces=('last.pth', 'log.csv')):
        assert (out / 'last.pth').read_bytes() == b'new weights' and not (out / 'log.csv').exists()
    with claim():
        (out / 'last.pth').write_bytes(b'newest')
    assert sorted(p.name for p in out.iterdir()) == ['keep.txt', 'last.pth'] and not (out / ASIDE_NAME).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path) -> None:
    import socket

    from timm_inception_pcam.storage import LOCK_NAME, claim_output_dir

    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    out = tmp_path / 'run'
    out.mkdir()
    (out / LOCK_NAME).write_text(f'{dead.pid} {socket.gethostname()}\n')
    partial = out / '.last.pth.abc123.partial'
    partial.write_bytes(b'half a checkpoint')
    with claim_output_dir(out):
        assert (out / LOCK_NAME).read_text().split()[0] == str(os.getpid())
        assert not partial.exists(), 'temporary files of the killed run are cleaned'
    (out / LOCK_NAME).write_text(f'{os.getppid()} {socket.gethostname()}\n')  # a live process
    with pytest.raises(OutputError, match=f'in use by another run \\(pid {os.getppid()}'):
        with claim_output_dir(out):
            pass


def test_two_trainings_into_one_folder(pcam_dir, tmp_path, capsys) -> None:
    """A second run into a folder in use is refused; once the first is killed, its lock is stale and taken over,
    and the folder's finished epoch is refused until --resume or --overwrite says what to do with it."""
    out = tmp_path / 'shared'
    first = subprocess.Popen([sys.executable, '-m', 'timm_inception_pcam.train',
                              *quick_args(pcam_dir, out, '--epochs', '50')],
                             env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / LAST_NAME, first)
        line = _exit_2_one_line(capsys, quick_args(pcam_dir, out, '--epochs', '1'), 'is in use by another run',
                                f'pid {first.pid}')
        assert '--output' in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    _exit_2_one_line(capsys, quick_args(pcam_dir, out, '--epochs', '1'), 'already holds a run',
                     f'--resume {out / LAST_NAME}', '--overwrite')
    result = main(quick_args(pcam_dir, out, '--epochs', '1', '--overwrite'))
    assert [row['epoch'] for row in result.history] == [0]
    assert read_checkpoint(out / LAST_NAME)['epoch'] == 0
    assert not list(out.glob('.*partial*')) and not (out / '.lock').exists()


def test_resume_alone_continues_the_run_as_it_was_started(finished_run, pcam_dir, tmp_path, caplog) -> None:
    """`--resume RUN/last.pth` with nothing else (the README's line): the data folder, architecture and schedule are
    the run's own (it was refused for a missing --data-dir, then for other --model-kwargs); a given option wins."""
    run = tmp_path / 'run'
    shutil.copytree(finished_run.output, run)
    cfg = config_from_args(['--resume', str(run / LAST_NAME), '--epochs', '3'])
    want = quick_config(pcam_dir, run, epochs=3)
    assert (cfg.data_dir, cfg.model, cfg.model_kwargs, cfg.batch_size, cfg.steps_per_epoch, cfg.limit_val,
            cfg.precision, cfg.epochs, cfg.run_dir) == (want.data_dir, want.model, {'depths': [1, 1, 1]},
                                                        want.batch_size, want.steps_per_epoch, want.limit_val,
                                                        want.precision, 3, run)
    result = main(['--resume', str(run / LAST_NAME), '--epochs', '3', '--no-progress'])
    assert [row['epoch'] for row in result.history] == [0, 1, 2]
    before = (run / LAST_NAME).read_bytes()
    with caplog.at_level(logging.INFO, logger='timm_inception_pcam.train'):  # a finished run: said, not "epochs 3..2"
        again = main(['--resume', str(run / LAST_NAME), '--no-progress'])
    assert [row['epoch'] for row in again.history] == [0, 1, 2] and (run / LAST_NAME).read_bytes() == before
    assert any(r.getMessage().startswith(f'nothing to train: {run / LAST_NAME} has done all 3 epochs')
               for r in caplog.records)
    assert not any('epochs 3..2' in r.getMessage() for r in caplog.records)
    elsewhere = main(['--resume', str(run / LAST_NAME), '--output', str(tmp_path / 'elsewhere'), '--epochs', '4',
                      '--no-progress'])  # the best checkpoint it names is there (it was only in the first folder)
    assert elsewhere.best_checkpoint is not None and elsewhere.best_checkpoint.is_file()
    assert elsewhere.best_checkpoint.parent == tmp_path / 'elsewhere' and (run / LAST_NAME).read_bytes() == before
    done = main(['--resume', str(run / LAST_NAME), '--output', str(tmp_path / 'done'), '--no-progress'])
    assert all(p.is_file() for p in (done.last_checkpoint, done.best_checkpoint, tmp_path / 'done' / LOG_CSV))
    with pytest.raises(SystemExit):  # without --resume, --data-dir is required as before
        config_from_args(['--output', str(run)])
    garbage = tmp_path / 'garbage.pth'
    garbage.write_text('x')
    for path, message in ((garbage, 'cannot load as a weights-only PyTorch checkpoint'),  # the file's own problem,
                          (tmp_path, 'a folder, expected a checkpoint file'),  # not 'required: --data-dir'
                          (tmp_path / 'none.pth', 'no such file')):
        with pytest.raises(PCamError, match=message):
            config_from_args(['--resume', str(path)])
    assert TrainConfig(data_dir='data').record()['data_dir'] == os.path.abspath('data')  # found from any cwd


def test_offline_url_weights_are_not_fetched(tmp_path, monkeypatch) -> None:
    """HF_HUB_OFFLINE=1 skips the download attempt for weights behind a URL too (googlenet_pcam's torchvision file:
    it printed 'Downloading ...' and failed on the network); once in the torch hub cache they are used."""
    import timm

    from timm_inception_pcam.train import model as train_model

    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    monkeypatch.setattr(timm, 'create_model', lambda *a, **k: pytest.fail('a download was attempted'))
    model, why = train_model._pretrained('googlenet_pcam', {'num_classes': 2})
    assert model is None and why == ('googlenet_pcam.tv_in1k: not in the torch hub cache '
                                     '(https://download.pytorch.org/models/googlenet-1378be20.pth) and HF_HUB_OFFLINE '
                                     'is set')
    (tmp_path / 'checkpoints').mkdir()
    (tmp_path / 'checkpoints' / 'googlenet-1378be20.pth').write_bytes(b'cached')
    assert train_model._in_torch_hub_cache('https://download.pytorch.org/models/googlenet-1378be20.pth')


def test_initial_checkpoint_goes_through_load_model(finished_run, pcam_dir, tmp_path) -> None:
    """--initial-checkpoint: the weights (and architecture) of a checkpoint, loaded by checkpoint.load_model."""
    from timm_inception_pcam.train.model import create_train_model

    cfg = TrainConfig(data_dir=pcam_dir, output=tmp_path / 'x', initial_checkpoint=finished_run.best_checkpoint)
    model, kwargs, source = create_train_model(cfg)  # no --model-kwargs: depths come from the checkpoint
    assert tuple(kwargs['depths']) == (1, 1, 1) and source.startswith('initial checkpoint')
    want = load_model(None, finished_run.best_checkpoint).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_validation_preprocessing_is_preprocess_patches(pcam_dir) -> None:
    """One preprocessing: the evaluation transform, the trainer's validation batches and preprocess_patches agree
    bit for bit."""
    from timm_inception_pcam.data import PCamDataset, create_pcam_transform
    from timm_inception_pcam.preprocess import preprocess_patches
    from timm_inception_pcam.train.loop import _preprocessed_batch

    ds = PCamDataset(pcam_dir, 'valid')
    patches, labels = ds.read_batch(np.arange(6))
    want = preprocess_patches(patches)
    transform = create_pcam_transform(is_training=False)
    per_patch = torch.stack([transform(p) for p in patches]).numpy()
    assert per_patch.dtype == np.float32 and np.array_equal(per_patch, want)
    x, y = _preprocessed_batch([ds[i] for i in range(6)])
    assert np.array_equal(x.numpy(), want) and np.array_equal(y.numpy(), labels)
    assert not np.array_equal(torch.stack([create_pcam_transform(is_training=True)(p) for p in patches]).numpy(),
                              want), 'training augments'


def test_bf16_validation_scores_do_not_tie(pcam_dir) -> None:
    """Early in training the two logits are near-equal: in bf16 every validation patch got one score (AUC exactly
    0.5, the wrong best epoch). The head runs in float32: the scores are float32's to bf16 feature rounding."""
    from timm_inception_pcam.data import PCamDataset
    from timm_inception_pcam.train.loop import _preprocessed_batch, predict

    torch.manual_seed(0)
    model = timm.create_model('inception_v4_pcam', depths=(1, 1, 1)).eval()  # untrained: probabilities ~1e-5 apart

    ds = PCamDataset(pcam_dir, 'valid')
    loader = [_preprocessed_batch([ds[i] for i in range(j, j + 8)]) for j in range(0, 24, 8)]
    cpu = torch.device('cpu')
    labels, fp32 = predict(model, loader, cpu, None, False, show=False)
    _, bf16 = predict(model, loader, cpu, torch.bfloat16, False, show=False)
    assert len(np.unique(fp32)) >= 20 and len(np.unique(bf16)) >= 20  # bf16 end to end: one value
    np.testing.assert_allclose(bf16, fp32, atol=1e-6)


def test_loss_is_float32_under_bf16_autocast() -> None:
    """CPU autocast kept label smoothing's log-softmax in bf16 (losses logged as 0.65869140625)."""
    from timm.loss import LabelSmoothingCrossEntropy

    from timm_inception_pcam.train.loop import training_loss

    logits = torch.randn(8, 2)
    y = torch.randint(0, 2, (8,))
    for loss_fn in (LabelSmoothingCrossEntropy(0.1), torch.nn.CrossEntropyLoss()):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = training_loss(logits.bfloat16(), y, loss_fn, 0.0)
            aux = training_loss((logits.bfloat16(), (logits.bfloat16(),)), y, loss_fn, 0.3)
        assert loss.dtype == aux.dtype == torch.float32
        assert torch.allclose(aux, 1.3 * loss)
