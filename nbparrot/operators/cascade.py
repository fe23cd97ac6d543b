"""Cascades for ``filter`` and ``classify``: the strong model only where the cheap one is unsure.

``cascade=(cheap, strong)`` with ``target=0.9`` runs in three passes under one ``Run``
(``nbparrot.staged``):

1. the cheap model decides every row, with ``logprobs``: the confidence of a decision is the
   probability of the decided value's tokens (``decisions.value_probability``);
2. the strong model decides a fixed random sample of the rows the cheap model answered
   (``cascade_sample`` rows; default a tenth of the rows, at least 100 and at most 500);
3. on that sample the *band* is learned: per decided value (true / false for ``filter``, one for
   every label of ``classify``) the lowest confidence at which the cheap answer is kept. It is
   the band that keeps the most cheap answers while the disagreement with the strong model it
   lets through, counted on the sample with a 95% Wilson upper bound and scaled to the rows
   decided outside the sample, stays within ``1 - target``. The strong model then decides the
   rows below their threshold (and those the cheap model failed or gave no confidence for).

The result is one decision per row: the strong model's on the sample and the unsure rows, the
cheap model's elsewhere. ``run.cascade`` reports the stage, the thresholds, rows and requests per
model, the cost against asking the strong model alone, and the estimated agreement with it (the
sample's point estimate, and the bound the band was chosen with). The bound is computed on the
same sample the band was chosen on, so it is an estimate, not a guarantee. The estimate counts the
cheap pass as planned, the sample and, at most, every other row on the strong model (~30% expected);
passes found whole in the cache are planned through, so a rerun is estimated at 0 requests.

Before any request: ``target`` outside (0, 1), the same model twice, a model known to refuse
logprobs (OpenAI's reasoning models: o1, o3, o4-mini, gpt-5) or ``mode="batch"`` raise
``ConfigError``. An endpoint that answers without logprobs stops the run with
``LogprobsUnavailableError`` on its first answer, which goes alone (nothing else is sent).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import numpy as np

from ..engine import Engine
from ..errors import ConfigError, LogprobsUnavailableError
from ..outcomes import OK, PENDING, SKIPPED, Outcomes
from ..prepare import RenderError
from ..pricing import Estimate, format_usd
from ..staged import PlanEstimate, Staged, StagedRun, Work, launch_staged
from ..tokens import estimate_prompt_tokens

__all__ = ["Cascade", "check_cascade", "launch", "learn_band", "wilson_upper", "CascadeRun"]

#: OpenAI models that refuse ``logprobs`` (403 "You are not allowed to request logprobs from this model").
NO_LOGPROBS = re.compile(r"^(o1|o3|o4|gpt-5)(\b|-|$)")
EXPECTED_UNSURE = 0.3  # the estimate's expected share of rows the strong model decides after the sample
Z95 = 1.6448536269514722  # one-sided 95% normal quantile


class Cascade:
    """A checked ``cascade=(cheap, strong)`` with its ``target`` and sample size."""

    def __init__(self, cheap: str, strong: str, target: float, sample: int | None):
        self.cheap, self.strong, self.target, self.sample = cheap, strong, target, sample

    def sample_size(self, rows: int) -> int:
        """Rows the strong model labels to learn the band: ``cascade_sample``, else 10% in [100, 500]."""
        size = self.sample if self.sample is not None else min(500, max(100, rows // 10))
        return min(size, rows)


def check_cascade(cascade: Any, target: Any, sample: Any, options: Mapping[str, Any]) -> Cascade | None:
    """The cascade arguments, checked before anything else (``ConfigError`` naming the problem)."""
    if cascade is None:
        if target is not None or sample is not None:
            raise ConfigError("target= and cascade_sample= need cascade=(cheap_model, strong_model)")
        return None
    if (isinstance(cascade, (str, bytes)) or not isinstance(cascade, Sequence) or len(cascade) != 2
            or not all(isinstance(m, str) and m for m in cascade)):
        raise ConfigError(f"cascade must be two model names (cheap_model, strong_model), not {cascade!r}")
    cheap, strong = cascade
    if cheap == strong:
        raise ConfigError(f"cascade names {cheap!r} twice: give a cheap and a different, stronger model")
    target = 0.9 if target is None else target
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 1:
        raise ConfigError(f"target must be a number between 0 and 1 (agreement with the strong model), not {target!r}")
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int) or sample < 1):
        raise ConfigError(f"cascade_sample must be a positive number of rows, not {sample!r}")
    if options.get("model") is not None:
        raise ConfigError("with cascade= the models are the cascade's: leave model= out")
    if options.get("mode", "live") != "live":
        raise ConfigError("a cascade chooses its second stage from the first one's answers: use mode='live'")
    for model in cascade:
        if NO_LOGPROBS.match(model):
            raise ConfigError(f"{model!r} returns no logprobs (OpenAI's reasoning models refuse them), and a "
                              "cascade reads the cheap model's confidence from them: use e.g. gpt-4.1-nano")
    return Cascade(cheap, strong, float(target), sample)


def wilson_upper(errors: int, n: int, z: float = Z95) -> float:
    """The one-sided Wilson upper bound of a rate seen as ``errors`` out of ``n``."""
    if n <= 0:
        return 1.0
    p, z2 = errors / n, z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z2 / n))


def learn_band(groups: np.ndarray, confidence: np.ndarray, disagree: np.ndarray, target: float,
               outside_share: float) -> tuple[dict[int, float | None], int]:
    """Per group, the lowest confidence at which a cheap answer is kept (None: never), and the
    sample's disagreements it lets through.

    Keeps the most sample rows such that ``wilson_upper(errors, n) * outside_share <= 1 - target``
    (``outside_share``: the share of decided rows outside the sample); keeping none always qualifies."""
    n = len(groups)
    allowed = -1
    while allowed + 1 <= n and wilson_upper(allowed + 1, n) * outside_share <= 1 - target:
        allowed += 1
    # per group: candidate kept counts (at distinct confidences), their errors and thresholds
    options = []
    for g in sorted(set(groups.tolist())):
        rows = np.flatnonzero(groups == g)
        order = rows[np.argsort(-confidence[rows], kind="stable")]
        conf, errs = confidence[order], np.cumsum(disagree[order])
        ends = [k + 1 for k in range(len(order)) if k + 1 == len(order) or conf[k + 1] < conf[k]]
        options.append((g, [0] + ends, [0] + [int(errs[e - 1]) for e in ends], [None] + [float(conf[e - 1]) for e in ends]))
    best: tuple[int, int, list[int]] = (0, 0, [0] * len(options))  # (kept, -errors, choice per group)
    if allowed >= 0:
        best = _best_choice(options, allowed, best)
    thresholds = {g: thresholds[pick] for (g, _, _, thresholds), pick in zip(options, best[2])}
    return thresholds, -best[1]


def _best_choice(options: list, allowed: int, best: tuple) -> tuple:
    """The choice of kept counts per group (at most two groups searched jointly, more greedily)."""
    if len(options) <= 2:
        first = options[0]
        second = options[1] if len(options) == 2 else (None, [0], [0], [None])
        errs2 = np.asarray(second[2])
        for i, (kept1, err1) in enumerate(zip(first[1], first[2])):
            left = allowed - err1
            if left < 0:
                break
            j = int(np.searchsorted(errs2, left, side="right")) - 1
            candidate = (kept1 + second[1][j], -(err1 + int(errs2[j])), [i, j][:len(options)])
            if candidate[:2] > best[:2]:
                best = candidate
        return best
    # Several labels: spend the allowed errors where they keep the most rows per error.
    picks, used = [0] * len(options), 0
    while True:
        step = None
        for gi, (_, kept, errs, _) in enumerate(options):
            for j in range(picks[gi] + 1, len(kept)):
                extra_err = errs[j] - errs[picks[gi]]
                if used + extra_err > allowed:
                    break
                gain = (kept[j] - kept[picks[gi]]) / (extra_err + 1e-9)
                if step is None or gain > step[0]:
                    step = (gain, gi, j, extra_err)
        if step is None:
            break
        _, gi, j, extra_err = step
        picks[gi], used = j, used + extra_err
    kept = sum(options[g][1][p] for g, p in enumerate(picks))
    return (kept, -used, picks) if (kept, -used) > best[:2] else best


class _Rows:
    """Some requests of a ``Prepared``, as a pass's source: request ``k`` is ``rows[k]`` there."""

    def __init__(self, prepared: Any, rows: list[int]):
        self.prepared, self.rows = prepared, rows

    def __len__(self) -> int:
        return len(self.rows)

    def render(self, k: int) -> Any:
        return self.prepared.render(self.rows[k])

    def skip_reason(self, k: int) -> str:
        return self.prepared.skip_reason(self.rows[k])

    def user_text(self, k: int) -> str | None:
        return self.prepared.user_text(self.rows[k])

    @property
    def request_index(self) -> Any:
        return self.prepared.request_index[self.rows]


class _Confidence:
    """The cheap pass's ``extract``: the decided value's probability; no logprobs stops the run."""

    def __init__(self, field: str, model: str):
        self.field, self.model, self.engine = field, model, None

    def __call__(self, choice: Mapping[str, Any], progress: Any) -> float | None:
        from .decisions import value_probability

        if not choice.get("logprobs") and self.engine is not None and self.engine.fatal is None:
            self.engine._stop_run(LogprobsUnavailableError(
                f"{self.engine.endpoint.display_url} answered {self.model!r} without logprobs, and a cascade "
                "reads the cheap model's confidence from them; nothing else was sent. Use an endpoint or a "
                "model that returns logprobs (e.g. OpenAI's gpt-4.1-nano / gpt-4o-mini), or drop cascade="))
        return value_probability(choice, self.field)


class CascadeWork(Work):
    """The three passes of a cascade, and how their outcomes make each row's final one (see the module docstring)."""

    def __init__(self, spec: Cascade, prepared: Any, body: Mapping[str, Any], field: str, schema: Any):
        self.spec, self.prepared, self.field, self.schema = spec, prepared, field, schema
        n = len(prepared)
        self.outcomes = Outcomes(n)
        self.cheap_body = {**body, "model": spec.cheap, "logprobs": True}
        self.strong_body = {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}
        self.strong_body["model"] = spec.strong
        self.source = np.full(n, -1, dtype=np.int8)  # row -> the pass whose outcome is its final one
        self.position = np.zeros(n, dtype=np.int64)  # row -> its request number in that pass
        self.engines: list[Engine] = []  # the passes started: cheap, sample, unsure rows
        self.cheap: Engine | None = None  # the cheap pass, planned by ``plan``
        self.later: list[int] = []  # per pass, the requests planned after it
        self.sample_rows: list[int] = []
        self.unsure_rows: list[int] = []
        self.thresholds: dict[Any, float | None] | None = None
        self.sample_errors = 0
        self.learned_on = 0
        self.sample_agreement: float | None = None
        self.stage_name = "planning"

    # ---- the passes --------------------------------------------------------------------

    def _cheap_engine(self, staged: Staged) -> Engine:
        extract = _Confidence(self.field, self.spec.cheap)
        extract.engine = staged.engine(self.prepared, self.cheap_body, schema=self.schema, extract=extract)
        return extract.engine

    def _strong_engine(self, staged: Staged, rows: list[int]) -> Engine:
        return staged.engine(_Rows(self.prepared, rows), self.strong_body, schema=self.schema)

    async def plan(self, staged: Staged) -> PlanEstimate:
        """The cheap pass as planned; the sample and the unsure rows planned through the cache when the
        passes before them are found whole there, else at most (every other row; ~30% expected)."""
        strong = self.spec.strong
        staged.progress.own_note = f"preparing: {self.spec.cheap} on every row"
        cheap = self.cheap = self._cheap_engine(staged)
        passes = [(f"{self.spec.cheap} on every row", await cheap.prepare(), "")]
        if not passes[0][1].requests:
            sample = self._choose_sample(cheap.outcomes)
            engine = self._strong_engine(staged, sample)
            passes.append((f"{strong} on the sample", await engine.prepare(), ""))
            if not passes[1][1].requests:
                self._learn(cheap.outcomes, sample, engine.outcomes)
                unsure = self._route(cheap.outcomes, sample)[1]
                passes.append((f"{strong} on the unsure rows", await self._strong_engine(staged, unsure).prepare(), ""))
                self.thresholds, self.sample_errors, self.learned_on, self.sample_agreement = None, 0, 0, None
        passes += self._bounds(staged, len(passes))
        self.later = [sum(e.requests for _, e, _ in passes[k + 1:]) for k in range(len(passes))]
        return PlanEstimate(passes)

    def _bounds(self, staged: Staged, planned: int) -> list[tuple[str, Estimate, str]]:
        """The passes after the first ``planned``, at most: the sample, and every other row (~30% expected)."""
        n, strong = len(self.prepared), self.spec.strong
        sample = self.spec.sample_size(n)
        probe = [m for m in map(self._rendered, range(0, n, max(1, n // 20))) if m is not None]
        prompt = int(sum(map(estimate_prompt_tokens, probe)) / len(probe)) if probe else 0
        reply = int(self.strong_body.get("max_tokens") or self.strong_body.get("max_completion_tokens") or 0)
        at = lambda rows: staged.estimate_of(strong, rows, prompt * rows, reply * rows)  # noqa: E731
        out = [(f"{strong} on the sample", at(sample), "≤")] if planned < 2 else []
        if planned < 3:
            rest = n - sample
            expected = math.ceil(rest * EXPECTED_UNSURE)
            out.append((f"{strong} on the unsure rows (~{expected:,} expected)",
                        at(rest)._replace(expected_cost=at(expected).expected_cost), "≤"))
        return out

    def _rendered(self, request: int) -> Any:
        try:
            return self.prepared.render(request)
        except RenderError:  # the cheap pass fails that row
            return None

    async def run(self, staged: Staged) -> None:
        spec = self.spec
        self.stage_name = "cheap pass"
        if not await self._send(staged, self.cheap, f"cascade 1/3: {spec.cheap} on every row", None):
            return
        cheap = self.cheap.outcomes
        self.sample_rows = self._choose_sample(cheap)
        self.stage_name = "strong model on the sample"
        sample = self._strong_engine(staged, self.sample_rows)
        if not await self._send(staged, sample, f"cascade 2/3: {spec.strong} on a sample of {len(self.sample_rows):,} "
                                "rows (learning the band)", self.sample_rows):
            return
        self._learn(cheap, self.sample_rows, sample.outcomes)
        keep, self.unsure_rows = self._route(cheap, self.sample_rows)
        self.source[keep] = 0
        self.position[keep] = keep
        self._copy()
        if self.unsure_rows:
            self.stage_name = "strong model on the unsure rows"
            if not await self._send(staged, self._strong_engine(staged, self.unsure_rows),
                                    f"cascade 3/3: {spec.strong} on {len(self.unsure_rows):,} unsure rows",
                                    self.unsure_rows):
                return
        self.stage_name = "done"

    async def _send(self, staged: Staged, engine: Engine, name: str, rows: list[int] | None) -> bool:
        """One pass (the final one of ``rows``): within the budget, started, awaited, its outcomes copied;
        False when the run stopped."""
        await engine.prepare()
        if engine.estimate.requests and staged.over_budget(name):
            return False
        staged.progress.own_note = name
        self.engines.append(engine)
        if rows is not None:
            self.source[rows] = len(self.engines) - 1
            self.position[rows] = np.arange(len(rows))
        run = staged.start(engine, engine.source, name)
        finished = await staged.follow(run, later=self.later[len(self.engines) - 1])
        self._copy()
        return finished

    def _copy(self) -> None:
        """Copy every final pass outcome not yet copied."""
        final = self.outcomes
        if self.engines:
            cheap = self.engines[0].outcomes
            skipped = [k for k in cheap.rows_with(SKIPPED) if self.source[k] < 0]
            self.source[skipped] = 0
            self.position[skipped] = skipped
        pending = np.flatnonzero(np.frombuffer(final.status, dtype=np.uint8) == Outcomes.code(PENDING))
        for k in pending[self.source[pending] >= 0].tolist():
            outcome = self.engines[self.source[k]].outcomes[int(self.position[k])]
            if outcome.status != PENDING:
                final[k].copy_from(outcome)

    def settle(self, reason: str) -> None:
        """The run has stopped: the final outcomes copied, the rows still open cancelled with ``reason``."""
        self._copy()
        if self.stage_name != "done":
            self.stage_name = "stopped"
        super().settle(reason)

    # ---- sampling, learning and routing -------------------------------------------------

    def _choose_sample(self, cheap: Outcomes) -> list[int]:
        """A fixed random sample of the rows the cheap model decided with a confidence."""
        candidates = [k for k in cheap.rows_with(OK) if cheap[k].extra is not None]
        size = min(self.spec.sample_size(len(cheap)), len(candidates))
        rng = np.random.default_rng(0)
        return sorted(rng.choice(candidates, size=size, replace=False).tolist()) if size else []

    def _value(self, outcome: Any) -> Any:
        parsed = outcome.parsed
        return parsed.get(self.field) if outcome.status == OK and isinstance(parsed, dict) else None

    def _learn(self, cheap: Outcomes, sample_rows: list[int], strong: Outcomes) -> None:
        groups, confidence, disagree = [], [], []
        for j, k in enumerate(sample_rows):
            mine, theirs = self._value(cheap[k]), self._value(strong[j])
            if mine is None or theirs is None or cheap[k].extra is None:
                continue
            groups.append(mine)
            confidence.append(float(cheap[k].extra))
            disagree.append(mine != theirs)
        self.learned_on = len(groups)
        decided = len(cheap) - cheap.count_status(SKIPPED)
        outside = (decided - len(sample_rows)) / decided if decided else 0.0
        if not groups:
            self.thresholds = {}
            return
        codes = {value: i for i, value in enumerate(dict.fromkeys(groups))}
        thresholds, self.sample_errors = learn_band(np.array([codes[g] for g in groups]), np.array(confidence),
                                                    np.array(disagree, dtype=np.int64), self.spec.target, outside)
        self.thresholds = {value: thresholds[i] for value, i in codes.items()}
        self.sample_agreement = 1 - sum(disagree) / len(disagree)

    def _route(self, cheap: Outcomes, sample_rows: list[int]) -> tuple[list[int], list[int]]:
        """Rows outside the sample: (kept from the cheap model, sent to the strong one)."""
        in_sample = set(sample_rows)
        keep, unsure = [], []
        for k in range(len(cheap)):
            if k in in_sample:
                continue
            outcome = cheap[k]
            if outcome.status == SKIPPED:
                continue
            value, confidence = self._value(outcome), outcome.extra
            threshold = self.thresholds.get(value) if value is not None else None
            if threshold is not None and confidence is not None and confidence >= threshold:
                keep.append(k)
            else:
                unsure.append(k)
        return keep, unsure

    # ---- reporting -------------------------------------------------------------------

    def model_of(self, row: int) -> str:
        return self.spec.strong if self.source[row] > 0 else self.spec.cheap

    def report(self) -> dict[str, Any]:
        """What ``run.cascade`` shows (see the module docstring)."""
        spec, final = self.spec, self.outcomes
        answered = np.frombuffer(final.status, dtype=np.uint8) == Outcomes.code(OK)
        by_strong = int(np.count_nonzero(answered & (self.source > 0)))
        decided = len(final) - final.count_status(SKIPPED)
        outside = (decided - len(self.sample_rows)) / decided if decided else 0.0
        report: dict[str, Any] = {
            "models": (spec.cheap, spec.strong), "target": spec.target, "stage": self.stage_name,
            "thresholds": None if self.thresholds is None else dict(self.thresholds),
            "sample": len(self.sample_rows),
            "rows": {spec.cheap: int(np.count_nonzero(answered)) - by_strong, spec.strong: by_strong},
            "requests": {spec.cheap: 0, spec.strong: 0},
            "cost": None, "strong_only_cost": None, "cost_ratio": None,
            "sample_agreement": self.sample_agreement, "agreement": None, "agreement_bound": None,
        }
        for engine in self.engines:
            report["requests"][engine.model] += len(engine.outcomes)
        if self.thresholds is not None and self.learned_on:
            report["agreement"] = 1 - self.sample_errors / self.learned_on * outside
            report["agreement_bound"] = 1 - wilson_upper(self.sample_errors, self.learned_on) * outside
        report.update(self._costs(decided))
        return report

    def _costs(self, decided: int) -> dict[str, Any]:
        """The cascade's price (every answer at list price, cached or not) against the strong model on every row."""
        total, strong_cost, strong_rows = 0.0, 0.0, 0
        for engine in self.engines:
            outcomes = engine.outcomes
            for k in outcomes.rows_with(OK):
                o = outcomes[k]
                usd = engine.usd(o.prompt_tokens, o.completion_tokens, o.cached_tokens)  # the endpoint's price
                if usd is None:
                    return {}
                total += usd
                if engine.model == self.spec.strong:
                    strong_cost, strong_rows = strong_cost + usd, strong_rows + 1
        if not strong_rows:
            return {"cost": total}
        strong_only = strong_cost / strong_rows * decided
        return {"cost": total, "strong_only_cost": strong_only, "cost_ratio": total / strong_only if strong_only else None}

    def describe(self) -> str:
        """One line for the summary and the panel: thresholds, rows per model, cost, agreement."""
        r = self.report()
        if r["thresholds"] is None:
            return f"cascade {self.stage_name}"
        kept = ", ".join(f"{v} ≥ {t:.3f}" if t is not None else f"{v}: never" for v, t in r["thresholds"].items())
        rows = " / ".join(f"{count:,} rows by {model}" for model, count in r["rows"].items())
        parts = [f"cascade: {rows}", f"kept cheap answers at {kept or 'none'}"]
        if r["cost_ratio"] is not None:
            parts.append(f"{format_usd(r['cost'])} vs {format_usd(r['strong_only_cost'])} strong-only "
                         f"({r['cost_ratio']:.0%})")
        if r["agreement"] is not None:
            parts.append(f"est. agreement with {self.spec.strong} {r['agreement']:.1%} "
                         f"(bound {r['agreement_bound']:.1%}, target {self.spec.target:.0%})")
        return "; ".join(parts)


class CascadeRun(StagedRun):
    """A ``Run`` of a cascade: ``run.cascade`` says how it went (see ``nbparrot.operators.cascade``)."""

    @property
    def cascade(self) -> dict[str, Any]:
        """Stage, thresholds, sample size, rows and requests per model, cost against the strong model
        alone, and the estimated agreement with it."""
        return self.engine.work.report()


def launch(setup: Any, prepared: Any, body: Mapping[str, Any], shape: Any, *, spec: Cascade, schema: Any,
           field: str, label: str) -> CascadeRun:
    """Start ``filter`` / ``classify``'s cascade (the models' passes under one ``CascadeRun``)."""
    return launch_staged(setup, CascadeWork(spec, prepared, body, field, schema), shape,
                         f"{label} · cascade {spec.cheap} → {spec.strong}, target {spec.target:.0%}",
                         models=(spec.cheap, spec.strong), run_class=CascadeRun)
