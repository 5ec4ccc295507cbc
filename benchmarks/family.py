"""The Inception family on PCam, side by side: every member trained with the same recipe on the same data.

    python -m benchmarks.run --sections family --output benchmarks/results/family            # synthetic data
    python -m benchmarks.run --sections family --data-dir /data/pcam --output runs/family     # official PCam

Each model is trained with the main job's recipe (`pipeline.train_config`: our trainer from random initialisation,
the same epochs, batch, learning rate and seed), evaluated on the same test split with the threshold chosen on valid
(`evaluate`, bootstrap 95 % CIs), and measured on this CPU: parameters, GMACs and feature grids at 96 px, inference
throughput at batch 64 with `eager` float32 and `auto`, training time. On synthetic data the ranking says how fast
each architecture learns this generator's cues in a few epochs, nothing about PCam or metastasis detection.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from timm_inception_pcam.checkpoint import load_model
from timm_inception_pcam.data import PCamDataset, synthesize_pcam
from timm_inception_pcam.data.provenance import folder_provenance
from timm_inception_pcam.evaluate import EvalConfig, evaluate
from timm_inception_pcam.inference import create_runner
from timm_inception_pcam.pipeline import PipelineConfig, train_config
from timm_inception_pcam.train import train

from .common import Sizes, summarize
from .models import complexity

__all__ = ['FAMILY', 'run', 'markdown']

# (model, paper): in the order the course teaches them
FAMILY: tuple[tuple[str, str], ...] = (
    ('vgg16_pcam', 'VGG16, arXiv 1409.1556'),
    ('googlenet_pcam', 'GoogLeNet / Inception-v1, arXiv 1409.4842'),
    ('inception_v3_pcam', 'Inception-v3, arXiv 1512.00567'),
    ('inception_resnet_v1_pcam', 'Inception-ResNet-v1, arXiv 1602.07261'),
    ('inception_v4_pcam', 'Inception-v4, arXiv 1602.07261'),
    ('inception_resnet_v2_pcam', 'Inception-ResNet-v2, arXiv 1602.07261'),
)
THROUGHPUT_BATCH = 64


def _quick_kwargs(name: str, sizes: Sizes) -> dict[str, Any]:
    """Reduced depth in quick mode for the models that take `depths` (the others are small enough)."""
    import timm

    if not sizes.quick or sizes.depths is None:
        return {}
    try:
        timm.create_model(name, depths=sizes.depths)
    except TypeError:
        return {}
    return {'depths': sizes.depths}


def _throughput(model: torch.nn.Module, patches: np.ndarray, backend: str, repeats: int) -> dict[str, Any]:
    runner = create_runner(model, backend, batch_size=THROUGHPUT_BATCH)
    try:
        batch = patches[:THROUGHPUT_BATCH]
        runner.logits(batch)  # warm-up (conversion, first-call set-up)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            runner.logits(batch)
            times.append(time.perf_counter() - t0)
        return {'backend': runner.spec.backend, **summarize(times, len(batch))}
    finally:
        runner.close()


def run(sizes: Sizes, workdir: Path, data_dir: str | None = None, progress: bool = True) -> dict[str, Any]:
    recipe = PipelineConfig(n_train=64 if sizes.quick else 512, n_eval=32 if sizes.quick else 256,
                            epochs=1 if sizes.quick else 2, workers=0 if sizes.quick else 2, progress=progress)
    if data_dir is None:
        data = workdir / 'data'
        if not (data / 'camelyonpatch_level_2_split_test_y.h5').is_file():
            synthesize_pcam(data, recipe.n_train, seed=recipe.seed, n_valid=recipe.n_eval, n_test=recipe.n_eval)
    else:
        data = Path(data_dir)
    provenance = folder_provenance(data)['provenance']
    test = PCamDataset(data, 'test')
    patches, _ = test.read_batch(np.arange(min(len(test), max(THROUGHPUT_BATCH, sizes.batch))))
    rows = []
    for name, paper in FAMILY:
        kwargs = _quick_kwargs(name, sizes)
        cfg = train_config(PipelineConfig(**{**recipe.__dict__, 'model': name, 'model_kwargs': kwargs}), data,
                           workdir / name, **({'steps_per_epoch': 2, 'limit_val': 16} if sizes.quick else {}))
        t0 = time.perf_counter()
        result = train(cfg)
        train_s = time.perf_counter() - t0
        checkpoint = result.best_checkpoint or result.last_checkpoint
        report = evaluate(EvalConfig(checkpoint=str(checkpoint), data_dir=str(data), split='test',
                                     threshold_from='valid', output=str(workdir / name / 'eval'), workers=0,
                                     bootstrap=200 if sizes.quick else 1000, overwrite=True).check())
        model = load_model(None, checkpoint)
        params, gmacs = complexity(model)
        grids = [96 // f['reduction'] for f in model.feature_info]
        speed = {b: _throughput(model, patches, b, sizes.repeats) for b in ('eager', 'auto')}
        m, ci = report['metrics'], report['ci95']
        rows.append({
            'model': name, 'paper': paper, 'kwargs': kwargs, 'params': params, 'gmacs': gmacs, 'grids': grids,
            'train_seconds': round(train_s, 1), 'epochs': cfg.epochs, 'best_val_roc_auc': result.best_metric,
            'eager_patches_per_s': speed['eager']['items_per_s'], 'auto_patches_per_s': speed['auto']['items_per_s'],
            'auto_backend': speed['auto']['backend'],
            'auto_vs_eager': speed['auto']['items_per_s'] / speed['eager']['items_per_s'],
            'test': {k: m.get(k) for k in ('roc_auc', 'accuracy', 'f1', 'weighted_f1')},
            'test_ci95': {k: ci.get(k) for k in ('roc_auc', 'accuracy', 'f1')}, 'n_test': report['n'],
        })
        del model
    return {'data': str(data), 'data_provenance': provenance, 'recipe': {
        'epochs': recipe.epochs, 'batch_size': recipe.batch_size, 'lr': recipe.lr, 'seed': recipe.seed,
        'n_train': recipe.n_train, 'n_eval': recipe.n_eval, 'pretrained': False}, 'models': rows}


def _ci(value: float | None, ci: Any, fmt) -> str:
    if value is None:
        return 'n/a'
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
        return f'{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]'
    return fmt(value)


def markdown(section: dict[str, Any], fmt) -> list[str]:
    r = section['recipe']
    synthetic = section['data_provenance'] != 'pcam'
    lines = [f'Data: {section["data_provenance"]} ({section["data"]}); recipe: {r["epochs"]} epochs from random '
             f'initialisation, batch {r["batch_size"]}, lr {r["lr"]}, seed {r["seed"]}, {r["n_train"]} training and '
             f'{r["n_eval"]} test patches; test metrics with bootstrap 95 % CIs, threshold chosen on valid.'
             + (' **Synthetic data: the ranking says how fast each architecture learns the generator\'s cues in a '
                'few epochs, not how it does on PCam.**' if synthetic else ''), '',
             '| model | paper | params (M) | GMACs | grids at 96 px | train s | eager patches/s | auto patches/s '
             '(backend) | test ROC AUC | accuracy | F1 |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for m in section['models']:
        label = m['model'] + (f' depths={tuple(m["kwargs"]["depths"])}' if m['kwargs'].get('depths') else '')
        t, ci = m['test'], m['test_ci95']
        lines.append(f'| {label} | {m["paper"]} | {m["params"] / 1e6:.2f} | {m["gmacs"]:.2f} | '
                     f'{"/".join(map(str, m["grids"]))} | {fmt(m["train_seconds"])} | '
                     f'{fmt(m["eager_patches_per_s"])} | {fmt(m["auto_patches_per_s"])} ({m["auto_backend"]}) | '
                     f'{_ci(t["roc_auc"], ci["roc_auc"], fmt)} | {_ci(t["accuracy"], ci["accuracy"], fmt)} | '
                     f'{_ci(t["f1"], ci["f1"], fmt)} |')
    return lines + ['']
