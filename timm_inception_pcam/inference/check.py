"""Low-precision logits with float32 decisions: the decision check (`bf16_checked`) and the evaluator's `Settler`.

`DecisionCheck` is itself a Runner: a fast runner (bf16) whose logits are replaced by an exact runner's (float32)
for every patch whose decision at the configured thresholds the fast path's rounding could have flipped. With
several fast stages (the int8 -> bf16 cascade), a stage that costs more than it saves is dropped once measured:
see `DecisionCheck.drop_costly_stages`.
"Could have flipped": the float32 class-1 logit margin it implies, ``fast margin - error`` for any error in the
stage's error range, lies on both sides of a threshold. The error range is centred on the median of the signed
fast-minus-exact margin errors measured so far (bf16 errors are often biased: inception_resnet_v2_pcam's are about
-0.03 logits near the threshold) and reaches `safety` x their 90th-percentile deviation from it, capped at
`LARGEST_FACTOR` x the largest deviation measured. The first `WARMUP_PATCHES` patches run both ways to measure
them, and every re-checked patch is one more measurement.

`Settler` does the same for an evaluation whose threshold is chosen only after scoring: it re-runs in float32 the
patches whose probability could change the choice of the threshold or a decision at it (through a cascade's later
stages first).
"""
from collections.abc import Callable, Sequence
from dataclasses import replace
from time import perf_counter
from typing import Any, Protocol

import numpy as np

from ..errors import UsageError
from ..metrics import select_threshold, threshold_metric_bounds
from ..preprocess import batch_slices, check_patches
from .base import Runner, collect_logits

__all__ = ['DEFAULT_SAFETY', 'ERROR_QUANTILE', 'LARGEST_FACTOR', 'MIN_DISTINCT', 'WARMUP_PATCHES', 'ERROR_HISTORY',
           'ErrorRange', 'DecisionCheck', 'Settler', 'class1_margin', 'error_range', 'mean_prob_bounds', 'straddling',
           'undecided']

# The error range reaches DEFAULT_SAFETY x the 90th percentile of the measured deviations from the median error,
# capped at LARGEST_FACTOR x the largest deviation. The percentile term guards heavy tails: on the benchmark's
# trained inception_v4_pcam the largest OpenVINO bf16 error near the threshold was 10.3x that percentile (4 let one
# decision of 1,024 flip). The cap keeps narrowly spread errors narrow: inception_resnet_v2_pcam's near-threshold
# errors are -0.03 +- 0.03, where 12x the percentile alone re-ran 15 % of the patches after the warm-up, not 3.8 %.
# Replayed on 4,096 patches of both models (5 thresholds x 8 orders, OpenVINO bf16 and int8) this rule flipped no
# decision; 2x the largest deviation alone flipped some (an offline replay of logged margins, 2026-12-04).
DEFAULT_SAFETY = 12.0
ERROR_QUANTILE = 0.9
LARGEST_FACTOR = 3.0
MIN_DISTINCT = 8  # different measured errors before a range is drawn from them
WARMUP_PATCHES = 64  # the first patches a check sees, run by every stage and exactly: its first measurements
ERROR_HISTORY = 8192  # measurements kept (the most recent): a slide of a million tiles must not grow them unbounded
DROP_AFTER = 256  # patches after the warm-up before a cascade stage's cost is judged (`drop_costly_stages`)

ErrorRange = tuple[float, float]  # (lo, hi): the fast-minus-exact class-1 margin error assumed possible
UNMEASURED: ErrorRange = (float('-inf'), float('inf'))


class PatchSource(Protocol):
    def __len__(self) -> int: ...

    def read_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def class1_margin(logits: np.ndarray) -> np.ndarray:
    """Class-1 logit margin (logit 1 - logit 0) of (N, 2) logits, in float64: sigmoid of it is the softmax's p1."""
    logits = np.asarray(logits, dtype=np.float64)
    return logits[..., 1] - logits[..., 0]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def error_range(errors: np.ndarray, safety: float) -> ErrorRange:
    """The margin error range assumed from measured signed fast-minus-exact `errors` (see the module docstring).

    Unbounded until `MIN_DISTINCT` different errors were measured: identical patches (a blank warm-up batch, a
    slide's uniform background) give identical errors, and a range of width zero built on them would trust every
    later patch.
    """
    if len(np.unique(errors)) < MIN_DISTINCT:
        return UNMEASURED
    center = float(np.median(errors))
    deviation = np.abs(errors - center)
    half = min(safety * float(np.quantile(deviation, ERROR_QUANTILE)), LARGEST_FACTOR * float(deviation.max()))
    return center - half, center + half


def mean_prob_bounds(margins: np.ndarray, error: ErrorRange) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi): the range of ``mean over views of sigmoid(margin - e)`` for every e in the `error` range.

    `margins` is (N,) or (views, N) class-1 logit margins of the fast path: the exact margin is ``margin - e``.
    """
    m = np.asarray(margins, dtype=np.float64)
    m = m[None] if m.ndim == 1 else m
    return _sigmoid(m - error[1]).mean(axis=0), _sigmoid(m - error[0]).mean(axis=0)


def straddling(lo: np.ndarray, hi: np.ndarray, thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """Which intervals [lo_i, hi_i] hold a threshold t with lo_i < t <= hi_i: whose decision ``p >= t`` is open."""
    t = np.sort(np.asarray(thresholds, dtype=np.float64).ravel())
    nxt = np.searchsorted(t, lo, side='right')  # the first threshold above each lower bound
    out = nxt < len(t)
    out[out] = t[nxt[out]] <= hi[out]
    return out


def undecided(margins: np.ndarray, thresholds: Sequence[float], error: ErrorRange) -> np.ndarray:
    """Which patches an error in the `error` range of every view's class-1 logit margin could move across a threshold.

    `margins` is (N,) or (views, N); a patch's decision is ``mean over views of sigmoid(margin) >= t`` (the
    evaluator averages test-time-augmentation probabilities). A NaN margin counts as undecided; +-inf as decided.
    """
    lo, hi = mean_prob_bounds(margins, error)
    nan = np.isnan(np.asarray(margins, dtype=np.float64)).reshape(-1, len(lo)).any(axis=0)
    return nan | straddling(lo, hi, thresholds)


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(t) for t in thresholds)
    if any(not 0.0 < t < 1.0 for t in values):
        raise UsageError(f'decision thresholds must be probabilities strictly between 0 and 1, got {list(values)}')
    return values


class DecisionCheck:
    """A checked runner: `fast` logits, replaced by `exact` ones for every patch whose decision is in doubt.

    In doubt: `undecided` at `thresholds` within the `error_range` of the signed fast-minus-exact class-1 margin
    errors measured so far (`safety` multiplies their `ERROR_QUANTILE` deviation). The first `WARMUP_PATCHES` patches
    are run by every stage and exactly (the first measurements); each re-checked patch is a further one, so the range
    follows the model and the data. The cap at `LARGEST_FACTOR` x the largest deviation
    only narrows it: on briefly trained models the largest errors (up to 17 logits, 4 % relative) come from patches
    whose margins are in the hundreds, nowhere near a threshold, and a range built on them alone would send every
    patch to float32. `exact` is also what `Settler` runs to settle the patches in doubt at a threshold chosen
    later. Non-finite fast logits are always re-run. An empty `thresholds` only measures the warm-up patches.
    `on_drop(k, figures)` is called when stage k is dropped (`drop_costly_stages`), with its entry of `stats()`.
    """

    def __init__(self, fast: Runner | Sequence[Runner], exact: Runner, thresholds: Sequence[float],
                 safety: float = DEFAULT_SAFETY, batch_size: int | None = None, name: str | None = None,
                 on_drop: Callable[[int, dict[str, Any]], None] | None = None):
        if not safety >= 1.0:
            raise UsageError(f'safety must be at least 1 (a multiple of the measured bf16 error), got {safety}')
        if batch_size is not None and batch_size < 1:
            raise UsageError(f'batch_size must be at least 1, got {batch_size}')
        self.stages: list[Runner] = list(fast) if isinstance(fast, Sequence) else [fast]
        if not self.stages:
            raise UsageError('a decision check needs at least one fast runner')
        self.fast, self.exact, self.safety, self.batch_size = self.stages[0], exact, float(safety), batch_size
        self.on_drop = on_drop
        self.thresholds = _check_thresholds(thresholds)
        self.num_classes = len(self.fast.spec.label_names)
        if self.num_classes != 2:
            raise UsageError(f'a decision check checks binary decisions; this model has {self.num_classes} classes '
                             f'(run {self.fast.spec.backend} or {exact.spec.backend} unchecked)')
        backends = [r.spec.backend for r in self.stages]
        self.spec = replace(self.fast.spec, backend=name or f'{backends[0]}_checked',
                            extra={**self.fast.spec.extra, 'stages': backends, 'checked_by': exact.spec.backend,
                                   'checked_precision': exact.spec.precision, 'thresholds': list(self.thresholds),
                                   'safety': self.safety})
        # per stage: signed stage - exact class-1 margin errors (the last ERROR_HISTORY measured), the largest |error|,
        # the error range (cached until the next measurement)
        self._errors = [np.zeros(0) for _ in self.stages]
        self._largest = [0.0 for _ in self.stages]
        self._ranges: list[ErrorRange | None] = [None for _ in self.stages]
        self._passed_on = [0 for _ in self.stages]  # patches each stage sent on to the next (or to exact)
        self._seen = [0 for _ in self.stages]  # patches each stage scored
        self._seconds = [0.0 for _ in self.stages]  # the time it took
        self._dropped: list[int | None] = [None for _ in self.stages]  # self.patches when the stage was dropped
        self._judged = [False for _ in self.stages]
        self._warmed = 0  # warm-up patches (every stage scored them and passed them on)
        self.patches = self.rechecked = 0

    def __repr__(self) -> str:
        return f'DecisionCheck(fast={self.stages!r}, exact={self.exact!r}, thresholds={self.thresholds})'

    @property
    def errors(self) -> np.ndarray:
        """The first (fastest) stage's measured signed margin errors (fast - exact)."""
        return self._errors[0]

    @property
    def largest_error(self) -> float:
        """The first stage's largest |margin error| ever measured."""
        return self._largest[0]

    def stage_range(self, k: int) -> ErrorRange:
        """Margin error range assumed for stage `k`'s logits (unbounded before the first measurement)."""
        if self._ranges[k] is None:
            self._ranges[k] = error_range(self._errors[k], self.safety)
        return self._ranges[k]

    @property
    def error_range(self) -> ErrorRange:
        """Margin error range assumed for a patch that was not re-checked: the union of the stages' ranges."""
        ranges = [self.stage_range(k) for k in range(len(self.stages))]
        return min(r[0] for r in ranges), max(r[1] for r in ranges)

    def observe(self, fast: np.ndarray, exact: np.ndarray, stage: int = 0) -> None:
        err = class1_margin(fast) - class1_margin(exact)
        err = err[np.isfinite(err)]
        self._errors[stage] = np.concatenate([self._errors[stage], err])[-ERROR_HISTORY:]
        self._largest[stage] = max(self._largest[stage], float(np.abs(err).max(initial=0.0)))
        self._ranges[stage] = None

    def _run_stage(self, k: int, patches: np.ndarray) -> np.ndarray:
        t0 = perf_counter()
        out = np.array(self.stages[k].logits(patches), dtype=np.float32)
        self._seconds[k] += perf_counter() - t0
        self._seen[k] += len(patches)
        return out

    def _active_stages(self) -> list[int]:
        return [k for k in range(len(self.stages)) if self._dropped[k] is None]

    def drop_costly_stages(self) -> list[int]:
        """Drop each fast stage that passes on so many patches that the next stage alone would be quicker.

        Judged once, when the stage has scored `DROP_AFTER` patches after the warm-up: with t = seconds per patch
        measured so far and p = the fraction it passed on, stage k goes when t_k + p_k t_next >= t_next. The next
        stage's t comes from the small batches it was given, which overstates it (that keeps a stage rather than
        dropping it). An int8 model that quantised badly passes almost everything on to bf16 (one benchmark model:
        93 %), and the cascade was then slower than bf16 checked alone. The last fast stage always stays; a dropped
        stage's error range still counts in `error_range` (earlier patches kept its logits). Returns the dropped.
        """
        dropped = []
        active = self._active_stages()
        for k, nxt in zip(active, active[1:]):
            judged = self._seen[k] - self._warmed
            if judged < DROP_AFTER or self._judged[k] or not self._seen[nxt]:
                continue
            self._judged[k] = True
            t_k, t_next = self._seconds[k] / self._seen[k], self._seconds[nxt] / self._seen[nxt]
            passed = (self._passed_on[k] - self._warmed) / judged
            if t_k + passed * t_next >= t_next:
                self._dropped[k] = self.patches
                dropped.append(k)
                if self.on_drop is not None:
                    self.on_drop(k, self._stage_stats(k))
        return dropped

    def logits(self, patches: np.ndarray) -> np.ndarray:
        """uint8 (N, 96, 96, 3) NHWC patches -> float32 logits (N, 2), float32's wherever a decision was in doubt."""
        patches = check_patches(patches)
        return collect_logits(lambda s: self._checked(patches[s]),
                              batch_slices(len(patches), self.batch_size or max(len(patches), 1)), 2,
                              f'{self.spec.backend} runner')

    def _checked(self, patches: np.ndarray) -> np.ndarray:
        """Each stage runs the patches the stage before could not decide; those still in doubt run exactly."""
        n = len(patches)
        active = self._active_stages()
        logits = self._run_stage(active[0], patches)
        seen = {active[0]: logits.copy()}  # what each stage answered, kept to measure it against exact
        doubt = np.arange(n)
        if not len(self._errors[0]):  # the first measurements: WARMUP_PATCHES through every stage and exactly
            warm, doubt = doubt[:WARMUP_PATCHES], doubt[WARMUP_PATCHES:]
            exact = self.exact.logits(patches[warm])
            for k in range(len(self.stages)):
                self.observe(seen[k][warm] if k in seen else self._run_stage(k, patches[warm]), exact, k)
                self._passed_on[k] += len(warm)
            logits[warm] = exact
            self.rechecked += len(warm)
            self._warmed += len(warm)
        for i, k in enumerate(active):
            if not len(doubt):
                break
            if i:
                out = np.full_like(logits, np.nan)
                out[doubt] = self._run_stage(k, patches[doubt])
                logits[doubt] = out[doubt]
                seen[k] = out
            margin = class1_margin(logits[doubt])
            doubt = doubt[undecided(margin, self.thresholds, self.stage_range(k)) | ~np.isfinite(margin)]
            self._passed_on[k] += len(doubt)
        if len(doubt):
            exact = self.exact.logits(patches[doubt])
            for k, answered in seen.items():
                self.observe(answered[doubt], exact, k)
            logits[doubt] = exact
        self.patches += n
        self.rechecked += len(doubt)
        self.drop_costly_stages()
        return logits

    def stats(self) -> dict[str, Any]:
        """What was checked: patches, re-checked patches and fraction, the measured errors and the range used."""
        measured = len(self.errors) > 0
        return {'thresholds': list(self.thresholds), 'safety': self.safety, 'error_quantile': ERROR_QUANTILE,
                'largest_factor': LARGEST_FACTOR, 'patches': self.patches, 'rechecked': self.rechecked,
                'rechecked_fraction': self.rechecked / self.patches if self.patches else None,
                'margin_error_median': float(np.median(self.errors)) if measured else None,
                'margin_error_abs_median': float(np.median(np.abs(self.errors))) if measured else None,
                'margin_error_max': self.largest_error if measured else None,
                'error_range': list(self.error_range) if measured else None,
                'stages': [self._stage_stats(k) for k in range(len(self.stages))]}

    def _stage_stats(self, k: int) -> dict[str, Any]:
        return {'backend': self.stages[k].spec.backend, 'seen': self._seen[k], 'passed_on': self._passed_on[k],
                'seconds': self._seconds[k], 'dropped_after': self._dropped[k],
                'error_range': list(self.stage_range(k)) if len(self._errors[k]) else None}

    def close(self) -> None:
        for runner in self.stages:
            runner.close()
        self.exact.close()


class Settler:
    """Float32 for a checked evaluation wherever the fast path could change what the report counts.

    `views` (tta, N) are class-1 probabilities of the patches of `data` from the `DecisionCheck` `check`; a patch
    is *settled* when all its views are recomputed by `check.exact` (in place). With several fast stages (the
    cascade) a patch in doubt first goes to the next stage (int8's views re-scored in bf16), and to float32 only if
    still in doubt within that stage's error range. `at` settles the patches whose decision at a threshold is in
    doubt; `choose` picks the valid threshold float32 would pick.
    """

    def __init__(self, check: DecisionCheck, data: PatchSource | np.ndarray, views: np.ndarray, batch_size: int):
        self.check, self.data, self.views, self.batch_size = check, data, views, batch_size
        self.exact = np.zeros(views.shape[1], dtype=bool)
        # 0: the views as the check gave them (any stage's error); k >= 1: re-scored by the check's stage k
        self.level = np.zeros(views.shape[1], dtype=np.int64)
        self.rescored = [0 for _ in check.stages]  # patches re-scored by each stage (index 0 unused)

    @property
    def settled(self) -> int:
        return int(self.exact.sum())

    def rerun(self, doubt: np.ndarray) -> int:
        """Re-score the patches of the boolean mask `doubt` not settled yet one stage further (float32 after the last
        fast stage); returns how many."""
        from .tta import view_probabilities

        idx = np.flatnonzero(doubt & ~self.exact)
        if not len(idx):
            return 0
        patches = self.data[idx] if isinstance(self.data, np.ndarray) else self.data.read_batch(idx)[0]
        step = self.level[idx] + 1
        for k in np.unique(step):
            part = step == k
            final = k >= len(self.check.stages)
            runner = self.check.exact if final else self.check.stages[k]
            self.views[:, idx[part]] = view_probabilities(
                runner, patches[part], self.batch_size, self.views.shape[0],
                desc='settle in float32' if final else f're-score in {runner.spec.backend}')
            if final:
                self.exact[idx[part]] = True
            else:
                self.level[idx[part]] = k
                self.rescored[k] += int(part.sum())
        return int(len(idx))

    def bounds(self, plain: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p, lo, hi): every patch's probability (view 0 if `plain`, else the mean over views) and its bounds,
        which are p itself once settled."""
        views = self.views[:1] if plain else self.views
        with np.errstate(divide='ignore'):
            margins = np.log(views) - np.log1p(-views)
        lo, hi = np.empty(views.shape[1]), np.empty(views.shape[1])
        for level in np.unique(self.level):
            at = self.level == level
            lo[at], hi[at] = mean_prob_bounds(margins[:, at], self.check.stage_range(int(level)) if level
                                              else self.check.error_range)
        p = views.mean(axis=0)
        lo[self.exact], hi[self.exact] = p[self.exact], p[self.exact]
        return p, lo, hi

    def at(self, threshold: float, plain: bool = False) -> int:
        """Re-score, stage after stage, every patch whose decision at `threshold` is in doubt; returns the re-runs."""
        runs = 0
        while True:
            _, lo, hi = self.bounds(plain)
            done = self.rerun(straddling(lo, hi, [threshold]))
            if not done:
                return runs
            runs += done

    def choose(self, labels: np.ndarray, method: str, plain: bool = False) -> float:
        """`select_threshold` on float32 probabilities, settling only the patches that could change its choice.

        A threshold t competes with the current choice c when its criterion could reach c's lowest possible
        value; the patches whose probability interval straddles a competitor are re-run (`rerun`: the next stage,
        float32 at the end; those of the more promising half of the competitors first, which often rules out the
        rest), and the choice is made again,
        until no unsettled patch straddles any competitor: then every criterion value that could beat c is exact,
        and c is float32's choice. How many patches that takes depends on how flat the criterion is around its
        maximum: a few percent of valid on a sharp one, most of it on a badly calibrated model.
        """
        while True:
            p, lo, hi = self.bounds(plain)
            choice = select_threshold(labels, p, method)
            floor = threshold_metric_bounds(labels, lo, hi, [choice], method)[0][0]
            candidates = np.unique(np.concatenate([lo, hi]))
            best = threshold_metric_bounds(labels, lo, hi, candidates, method)[1]
            rivals = best >= floor
            promising = best >= max(floor, float(np.median(best[rivals])))
            if not (self.rerun(straddling(lo, hi, candidates[promising]))
                    or self.rerun(straddling(lo, hi, candidates[rivals]))):
                return choice
