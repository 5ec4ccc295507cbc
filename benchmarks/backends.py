"""CPU inference backends for our models, side by side: throughput and the accuracy cost of each path.

Every backend is a runner of `timm_inception_pcam.inference` timed end to end (uint8 patches in, logits out, so
preprocessing is included) on the same batches, round-robin. The model is trained as the main job trains it
(`common.trained_model`), or given as a `--checkpoint`. The accuracy cost is measured against eager float32 on
labelled synthetic patches: decision agreement (argmax), ROC AUC change, largest probability difference.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from timm_inception_pcam.device import cpu_has_native_bf16
from timm_inception_pcam.inference import Runner, create_runner
from timm_inception_pcam.inference.check import DecisionCheck
from timm_inception_pcam.inference.factory import auto_backend
from timm_inception_pcam.inference.torch_runner import TorchRunner
from timm_inception_pcam.preprocess import batch_slices, model_normalization, preprocess_patches

from .common import Sizes, summarize, trained_model

__all__ = ['AGREEMENT_TARGET', 'SPEEDUP_TARGET', 'run', 'quantize_int8', 'accuracy_cost', 'markdown']

AGREEMENT_TARGET = 0.999
SPEEDUP_TARGET = 8.0  # `auto` vs eager float32 at batch 64 (issue 14's target for inception_v4_pcam)
SPEEDUP_TARGETS = {'inception_v4_pcam': 8.0, 'inception_resnet_v2_pcam': 6.0}
# Paths that change the arithmetic: measured on every evaluation patch. The float32 ones on `repeats` batches.
LOW_PRECISION = ('bf16', 'bf16_checked', 'compile_bf16', 'onnxruntime_int8', 'openvino_bf16', 'openvino_int8',
                 'openvino_bf16_checked', 'openvino_cascade')
OPENVINO = ('openvino_fp32', 'openvino_bf16', 'openvino_int8', 'openvino_bf16_checked', 'openvino_cascade')
CALIBRATION_PATCHES = 256
NOISE_BATCHES = 4  # batches of eager float32 re-run with input noise (the noise floor)


def _softmax1(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits).double(), dim=1)[:, 1].numpy()


def _auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, probs)) if len(np.unique(labels)) == 2 else None


def accuracy_cost(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Decision agreement, ROC AUC change and largest probability difference of `candidate` logits vs `reference`."""
    p_ref, p_cand = _softmax1(reference), _softmax1(candidate)
    auc_ref, auc_cand = _auc(labels, p_ref), _auc(labels, p_cand)
    agree = reference.argmax(1) == candidate.argmax(1)
    return {
        'n': int(len(labels)), 'decision_agreement': float(agree.mean()), 'disagreements': int((~agree).sum()),
        'roc_auc': auc_cand, 'roc_auc_fp32': auc_ref,
        'roc_auc_change': None if auc_ref is None or auc_cand is None else auc_cand - auc_ref,
        'max_abs_prob_diff': float(np.abs(p_ref - p_cand).max()),
        'max_abs_logit_diff': float(np.abs(reference - candidate).max()),
    }


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> Path:
    """onnxruntime static int8 quantisation (QDQ, per-channel weights, VNNI/AMX-friendly u8s8), metadata kept."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from export.spec import ONNX_METADATA_KEY
    from timm_inception_pcam.storage import atomic_path

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{'input': calibration[s]} for s in batch_slices(len(calibration), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with atomic_path(int8_path, suffix='.onnx') as tmp, warnings.catch_warnings():
        warnings.simplefilter('ignore')
        quantize_static(str(fp32_path), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        model = onnx.load_model(str(tmp))
        props = {p.key: p.value for p in onnx.load_model(str(fp32_path), load_external_data=False).metadata_props}
        meta = json.loads(props[ONNX_METADATA_KEY])
        props[ONNX_METADATA_KEY] = json.dumps({**meta, 'precision': 'int8'}, sort_keys=True)
        onnx.helper.set_model_props(model, props)
        onnx.save_model(model, str(tmp))
    return int8_path


@torch.inference_mode()
def _noise_floor(eager: TorchRunner, patches: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """How much eager float32 itself moves under imperceptible input noise (uniform +-0.5 grey level, below the 8-bit
    quantisation of the patches): a low-precision path cannot be judged more finely than the model's own sensitivity.
    The noise lies between uint8 levels, so the eager runner's module is fed the noisy normalised batches directly.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.from_numpy(preprocess_patches(patches, eager.spec.mean, eager.spec.std))
    scale = 1.0 / (255.0 * torch.tensor(eager.spec.std, dtype=torch.float32).view(1, 3, 1, 1))
    noisy = x + (torch.rand(x.shape, generator=g) - 0.5) * scale
    logits = np.concatenate([eager.model(noisy[s]).float().numpy() for s in batch_slices(len(x), eager.batch_size)])
    n = len(patches)
    return accuracy_cost(reference[:n], logits, labels[:n])


def _candidates(name: str, sizes: Sizes) -> dict[str, str | None]:
    """Backend -> None to measure it, or the reason it is skipped."""
    compile_name = 'compile_bf16' if cpu_has_native_bf16() else 'compile'
    no_bf16 = None if cpu_has_native_bf16() else 'neither AMX nor AVX-512 BF16 on this CPU: bfloat16 is emulated'
    out: dict[str, str | None] = {'eager': None, 'channels_last': None, 'bf16': no_bf16, 'bf16_checked': no_bf16}
    if not sizes.quick and name not in sizes.compile_models:
        out[compile_name] = f'torch.compile takes minutes per full-size model here; measured on ' \
                            f'{", ".join(sizes.compile_models) or "none"}'
    elif sizes.quick:
        out[compile_name] = 'quick mode (compilation takes minutes)'
    else:
        out[compile_name] = None
    out['onnxruntime'] = None if sizes.onnx else 'disabled'
    out['onnxruntime_int8'] = None if sizes.onnx else 'disabled'
    from timm_inception_pcam.inference.factory import openvino_available

    for backend in OPENVINO:
        needs_bf16 = 'bf16' in backend or 'cascade' in backend
        out[backend] = 'openvino is not installed' if not openvino_available() else (no_bf16 if needs_bf16 else None)
    return out


def _model_for(name: str, sizes: Sizes, workdir: Path, checkpoints: list[str], cache_dir: Path | None,
               progress: bool) -> tuple[nn.Module, str]:
    from timm_inception_pcam.checkpoint import load_model, read_checkpoint

    for checkpoint in checkpoints:
        if str(read_checkpoint(checkpoint).get('arch') or '').split('.')[0] == name:
            return load_model(None, checkpoint), f'trained checkpoint {checkpoint}'
    return trained_model(name, sizes, workdir, cache_dir, progress)


def _build(backend: str, name: str, model: nn.Module, sizes: Sizes, workdir: Path,
           calibration_patches: np.ndarray) -> Runner:
    if backend in ('openvino_int8', 'openvino_cascade'):
        return create_runner(model, backend, batch_size=sizes.batch, calibration=calibration_patches,
                             calibration_info={'source': f'{len(calibration_patches)} synthetic training patches of '
                                                         f'the benchmark'})
    if not backend.startswith('onnxruntime'):
        return create_runner(model, backend, batch_size=sizes.batch)
    from export.onnx import export_onnx
    from export.spec import IOSpec

    mean, std = model_normalization(model)
    fp32 = workdir / f'{name}.onnx'
    if not fp32.is_file():
        export_onnx(model, fp32, spec=IOSpec(mean=mean, std=std))
    path = fp32
    if backend == 'onnxruntime_int8':
        calibration = preprocess_patches(calibration_patches, mean, std, 'calibration patches')
        path = quantize_int8(fp32, fp32.with_suffix('.int8.onnx'), calibration)
    return create_runner(path, 'onnxruntime', batch_size=sizes.batch)


def bench_model(name: str, sizes: Sizes, workdir: Path, data: dict[str, tuple[np.ndarray, np.ndarray]],
                checkpoints: list[str] | None = None, cache_dir: Path | None = None,
                progress: bool = True) -> dict[str, Any]:
    model, source = _model_for(name, sizes, workdir, checkpoints or [], cache_dir, progress)
    patches, labels = data['eval']
    fit_patches = data['fit'][0]
    predictors: dict[str, Runner] = {}
    rows: dict[str, dict[str, Any]] = {}
    first = slice(0, min(sizes.batch, len(patches)))
    for backend, skip in _candidates(name, sizes).items():
        if skip:
            rows[backend] = {'status': 'skipped', 'reason': skip}
            continue
        t0 = time.perf_counter()
        try:
            predictor = _build(backend, name, model, sizes, workdir,
                               fit_patches[:CALIBRATION_PATCHES if backend.startswith('openvino') else 64])
            predictor.logits(patches[first])  # warm-up; triggers compilation
        except Exception as e:  # one broken backend must not hide the others
            rows[backend] = {'status': 'error', 'reason': f'{type(e).__name__}: {e}'}
            continue
        predictors[backend] = predictor
        rows[backend] = {'status': 'ok', 'setup_s': time.perf_counter() - t0}
        if 'cache_hit' in predictor.spec.extra:  # OpenVINO: setup_s includes conversion only without a cached one
            rows[backend]['conversion_cached'] = predictor.spec.extra['cache_hit']

    slices = list(batch_slices(len(patches), sizes.batch))
    logits = {b: np.full((len(patches), 2), np.nan, dtype=np.float32) for b in predictors}
    times: dict[str, dict[int, float]] = {b: {} for b in predictors}  # batch index -> seconds
    work = sum(len(slices) if (b == 'eager' or b in LOW_PRECISION) else min(sizes.repeats, len(slices))
               for b in predictors)
    with tqdm(total=work, desc=f'backends {name}', unit='batch', disable=not progress, leave=False) as bar:
        for i, s in enumerate(slices):
            for backend, predictor in predictors.items():
                if i >= sizes.repeats and backend != 'eager' and backend not in LOW_PRECISION:
                    continue
                t0 = time.perf_counter()
                logits[backend][s] = predictor.logits(patches[s])
                if s.stop - s.start == sizes.batch:
                    times[backend][i] = time.perf_counter() - t0
                bar.update(1)

    noise_floor = _noise_floor(predictors['eager'], patches[:sizes.batch * NOISE_BATCHES], logits['eager'], labels)
    for backend in predictors:
        row = rows[backend]
        row['timing'] = summarize(list(times[backend].values()), sizes.batch) if times[backend] else None
        # Throughput over every timed batch (patches / seconds), against eager on the same batches (the float32 paths
        # run on the first `repeats` only): same load, same data. Not a median batch: a checked path's cost depends
        # on how many of a batch's patches it re-runs, so its batch times are bimodal and the median batch is either
        # one with a re-run or one without, whichever half is larger.
        timed = [i for i in times[backend] if i in times.get('eager', {})]
        total = sum(times[backend][i] for i in timed)
        eager_total = sum(times['eager'][i] for i in timed)
        row['timed_batches'], row['seconds'], row['eager_seconds_same_batches'] = len(timed), total, eager_total
        row['patches_per_s'] = sizes.batch * len(timed) / total if total > 0 else None
        row['speedup_vs_eager'] = eager_total / total if total > 0 else None
        row['median_batch_speedup_vs_eager'] = (summarize([times['eager'][i] for i in timed])['median_s']
                                                / row['timing']['median_s']) if timed else None
        done = ~np.isnan(logits[backend][:, 0])
        row['accuracy'] = accuracy_cost(logits['eager'][done], logits[backend][done], labels[done])
        if isinstance(predictors[backend], DecisionCheck):  # what bf16_checked re-ran in float32 (warm-up included)
            row['check'] = predictors[backend].stats()
    for predictor in predictors.values():
        predictor.close()
    ok = {b: r for b, r in rows.items() if r['status'] == 'ok' and r['patches_per_s']}
    correct = {b: r for b, r in ok.items() if r['accuracy']['decision_agreement'] >= AGREEMENT_TARGET
               and not b.startswith('compile')}
    fastest = max(correct, key=lambda b: correct[b]['patches_per_s']) if correct else None
    auto = auto_backend(model)  # the cascade where this run's cascade row kept int8 (its int8 is cached now)
    result = {
        'model': name, 'model_source': source, 'batch': sizes.batch, 'n_eval': int(len(labels)),
        'logit_std_across_inputs': float(logits['eager'].std(axis=0).min()),
        'input_noise_floor': noise_floor,
        'backends': rows, 'auto': auto, 'fastest_correct_without_compile': fastest,
        'auto_is_fastest_correct': auto == fastest,
    }
    if auto in ok:
        result['auto_speedup_vs_eager'] = ok[auto]['speedup_vs_eager']
        result['auto_decision_agreement'] = ok[auto]['accuracy']['decision_agreement']
        target = SPEEDUP_TARGETS.get(name, SPEEDUP_TARGET)
        result['target'] = {
            'speedup': target, 'agreement': AGREEMENT_TARGET,
            'met': bool(ok[auto]['speedup_vs_eager'] >= target
                        and ok[auto]['accuracy']['decision_agreement'] >= AGREEMENT_TARGET),
            'applies': name in SPEEDUP_TARGETS and not sizes.quick,
        }
    return result


def run(sizes: Sizes, workdir: Path, data: dict[str, tuple[np.ndarray, np.ndarray]],
        checkpoints: list[str] | None = None, cache_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """`checkpoints`: trained weights to compare on (matched to the models by their 'arch'); the other models are
    trained here with the main job's recipe, their checkpoints cached in `cache_dir` for the next run."""
    workdir.mkdir(parents=True, exist_ok=True)
    return {'batch': sizes.batch, 'agreement_target': AGREEMENT_TARGET, 'speedup_target': SPEEDUP_TARGET,
            'models': [bench_model(name, sizes, workdir, data, checkpoints, cache_dir, progress)
                       for name in sizes.backend_models]}


def markdown(section: dict[str, Any], fmt) -> list[str]:
    lines = [f'Batch {section["batch"]}, end to end from uint8 patches; patches/s over every timed batch (all the '
             f'labelled patches for eager and the low-precision paths, the first batches for the float32 ones), '
             f'"vs eager" against eager on the same batches; accuracy against eager float32 (agreement target '
             f'{section["agreement_target"]:.1%}). "median batch" compares median batch times instead: a checked '
             f'path\'s batches take longer when one of their patches is re-run in float32, so its median batch '
             f'over- or understates its throughput.', '']
    for m in section['models']:
        lines += [f'**{m["model"]}** ({m["model_source"]}; {m["n_eval"]} labelled synthetic patches, '
                  f'logit std across inputs {fmt(m["logit_std_across_inputs"])}). `auto` = `{m["auto"]}`'
                  + (f', {fmt(m.get("auto_speedup_vs_eager"))}x eager' if m.get('auto_speedup_vs_eager') else '')
                  + f'; fastest correct (excluding compile): `{m["fastest_correct_without_compile"]}`.', '',
                  '| backend | patches/s | vs eager | median batch vs eager | setup s | agreement | '
                  'disagreements / n | AUC change | max prob diff |', '|' + ' --- |' * 9]
        for backend, r in m['backends'].items():
            if r['status'] != 'ok':
                lines.append(f'| {backend} | {r["status"]}: {r["reason"]} | | | | | | | |')
                continue
            a = r['accuracy']
            lines.append(f'| {backend} | {fmt(r["patches_per_s"])} | {fmt(r["speedup_vs_eager"])} | '
                         f'{fmt(r["median_batch_speedup_vs_eager"])} | {fmt(r["setup_s"])} | '
                         f'{a["decision_agreement"]:.4%} | {a["disagreements"]} / {a["n"]} | '
                         f'{fmt(a["roc_auc_change"])} | {fmt(a["max_abs_prob_diff"])} |')
        for backend, r in m['backends'].items():
            if r.get('check'):
                c = r['check']
                stages = ' -> '.join(
                    f'{st["backend"]} passed {st["passed_on"]} on'
                    + (f', dropped after {st["dropped_after"]} patches: it cost more than it saved'
                       if st.get('dropped_after') is not None else '') for st in c.get('stages', []))
                lo, hi = c['error_range']
                lines += ['', f'{backend} re-ran {c["rechecked"]} of {c["patches"]} patches in float32 ({stages}) '
                              f'({c["rechecked_fraction"]:.1%}, the warm-up batch measured in full included); error '
                              f'range [{fmt(lo)}, {fmt(hi)}] logits: centred on the median measured margin error '
                              f'({fmt(c["margin_error_median"])}), {fmt(c["safety"])} x the {c["error_quantile"]:.0%} '
                              f'quantile of the deviations from it, at most {fmt(c["largest_factor"])} x the largest '
                              f'(largest |error| {fmt(c["margin_error_max"])}).']
        nf = m['input_noise_floor']
        lines += ['', f'Noise floor: eager float32 under uniform +-0.5 grey-level input noise (below 8-bit '
                      f'quantisation) agrees with itself on {nf["decision_agreement"]:.2%} of {nf["n"]} patches '
                      f'(AUC change {fmt(nf["roc_auc_change"])}, max prob diff {fmt(nf["max_abs_prob_diff"])}).', '']
    return lines
