"""Which stage trains at each step, and every loss weight at that step.

`global_step` counts optimizer steps from 0. Stage boundaries follow the reference
(yjsunnn/DLoRAL src/train_DLoRAL.py): a boundary step belongs to the stage that ends there, so
the new stage starts on the step after it, and transition progress there is 1/T.

kind = "reference" (L, C, K: the lpips, csd and consistency base weights; f the LPIPS factor,
b the consistency boost, both 0.02 and 2 in the reference; p = (step - start) / T):
    step <= q1              consistency  lpips f*L, csd 0, cons b*K
    q1 < step <= q1f        detail       lpips L*(f + (1-f)p), csd C*p, cons K*(b - (b-1)p)
    q1f < step <= q1f+q2    consistency  lpips L, csd C, cons K*(1 + (b-1)p)
    step > q1f+q2           detail       lpips L, csd C, cons K*(b - (b-1)p)
with q1 = quality_iter, q1f = quality_iter_1_final, q2 = quality_iter_2; after a ramp (p = 1) the
weights stay at its end values. l2 is always its base weight.

Reference quirk, kept as is: after the first detail stage LPIPS and CSD stay at full weight for
the rest of training, including the second consistency stage. The reference only computes CSD
when stage == detail, and so does the recipe: `StepPlan.csd` reports the weight the reference sets,
`StepPlan.applied_csd` is what is actually applied (0 in consistency stages).

kind = "periodic": stages alternate every `alternation_period` steps (P), starting with
`first_stage`; stage k covers steps (k*P, (k+1)*P] (the first also step 0). The first stage sits
at its end weights. Each later stage ramps symmetrically over `transition_steps` steps, p as above:
    entering detail:       lpips L*(f + (1-f)p), csd C*p,     cons K*(b - (b-1)p)
    entering consistency:  lpips L*(1 - (1-f)p), csd C*(1-p), cons K*(1 + (b-1)p)
so a consistency stage ends at (f*L, 0, b*K) and a detail stage at (L, C, K), and every switch is
continuous. transition_steps = 0: hard switches (p = 1 from the stage's first step).
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULE_KINDS = ("reference", "periodic")
STAGES = ("consistency", "detail")


@dataclass
class ScheduleConfig:
    kind: str = "reference"
    quality_iter: int = 5000  # reference: last step of the first consistency stage
    quality_iter_1_final: int = 13000  # reference: last step of the first detail stage
    quality_iter_2: int = 5000  # reference: length of the second consistency stage
    alternation_period: int = 1000  # periodic: steps per stage
    first_stage: str = "consistency"  # periodic
    transition_steps: int = 1000  # both kinds; the reference hard-codes 1000

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule.kind must be one of {SCHEDULE_KINDS}; got {self.kind!r}")
        if self.first_stage not in STAGES:
            raise ValueError(
                f"schedule.first_stage must be one of {STAGES}; got {self.first_stage!r}"
            )
        if self.transition_steps < 0:
            raise ValueError(f"schedule.transition_steps must be >= 0; got {self.transition_steps}")
        if self.alternation_period < 1:
            raise ValueError(
                f"schedule.alternation_period must be >= 1; got {self.alternation_period}"
            )
        if self.kind == "periodic" and self.transition_steps > self.alternation_period:
            raise ValueError(
                f"schedule.transition_steps ({self.transition_steps}) must be <= "
                f"schedule.alternation_period ({self.alternation_period})"
            )
        if self.kind == "reference":
            self._check_reference()

    def _check_reference(self) -> None:
        q1, q1f, q2, t = (
            self.quality_iter,
            self.quality_iter_1_final,
            self.quality_iter_2,
            self.transition_steps,
        )
        if q1 < 0:
            raise ValueError(f"schedule.quality_iter must be >= 0; got {q1}")
        if q1f <= q1:
            raise ValueError(
                f"schedule.quality_iter_1_final ({q1f}) must be > schedule.quality_iter ({q1})"
            )
        if q2 < 1:
            raise ValueError(f"schedule.quality_iter_2 must be >= 1; got {q2}")
        # a ramp longer than its stage would be cut off mid-way and the weights would jump
        if t > q1f - q1 or t > q2:
            raise ValueError(
                f"schedule.transition_steps ({t}) must be <= the detail stage "
                f"(quality_iter_1_final - quality_iter = {q1f - q1}) and "
                f"schedule.quality_iter_2 ({q2})"
            )


@dataclass
class LossWeightsConfig:
    l2: float = 1.0
    lpips: float = 2.0
    csd: float = 1.0  # the reference's lambda_vsd
    consistency: float = 10.0
    lpips_consistency_factor: float = 0.02  # LPIPS scale in consistency stages
    consistency_boost: float = 2.0  # consistency-loss scale in consistency stages

    def __post_init__(self):
        for name in ("l2", "lpips", "csd", "consistency", "lpips_consistency_factor"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.weights.{name} must be >= 0; got {getattr(self, name)}")
        if self.consistency_boost < 0:
            raise ValueError(
                f"loss.weights.consistency_boost must be >= 0; got {self.consistency_boost}"
            )


@dataclass(frozen=True)
class StepPlan:
    step: int
    stage: str  # "consistency" | "detail"
    l2: float
    lpips: float
    csd: float  # as the schedule sets it (see applied_csd)
    consistency: float
    transition: float  # ramp progress in [0, 1]; 1 when not transitioning

    @property
    def applied_csd(self) -> float:
        """The CSD weight actually applied: CSD is computed in detail stages only."""
        return self.csd if self.stage == "detail" else 0.0


def _progress(step: int, start: int, transition_steps: int) -> float:
    """Ramp progress of a stage whose previous stage ended at `start`."""
    if transition_steps <= 0:
        return 1.0
    return min(1.0, (step - start) / transition_steps)


def _weights(entering: str, p: float, w: LossWeightsConfig) -> tuple[float, float, float]:
    """(lpips, csd, consistency) at progress p of the symmetric ramp into `entering`."""
    f, b = w.lpips_consistency_factor, w.consistency_boost
    if entering == "detail":
        return w.lpips * (f + (1 - f) * p), w.csd * p, w.consistency * (b - (b - 1) * p)
    return w.lpips * (1 - (1 - f) * p), w.csd * (1 - p), w.consistency * (1 + (b - 1) * p)


def _reference(step: int, s: ScheduleConfig, w: LossWeightsConfig) -> StepPlan:
    q1, q1f, q2, t = s.quality_iter, s.quality_iter_1_final, s.quality_iter_2, s.transition_steps
    f, b = w.lpips_consistency_factor, w.consistency_boost
    if step <= q1:
        stage, p = "consistency", 1.0
        lpips, csd, cons = w.lpips * f, 0.0, w.consistency * b
    elif step <= q1f:
        stage, p = "detail", _progress(step, q1, t)
        lpips, csd, cons = _weights("detail", p, w)
    elif step <= q1f + q2:
        stage, p = "consistency", _progress(step, q1f, t)
        lpips, csd, cons = w.lpips, w.csd, w.consistency * (1 + (b - 1) * p)
    else:
        stage, p = "detail", _progress(step, q1f + q2, t)
        lpips, csd, cons = w.lpips, w.csd, w.consistency * (b - (b - 1) * p)
    return StepPlan(step, stage, w.l2, lpips, csd, cons, p)


def _periodic(step: int, s: ScheduleConfig, w: LossWeightsConfig) -> StepPlan:
    period = s.alternation_period
    index = 0 if step <= 0 else (step - 1) // period
    other = "detail" if s.first_stage == "consistency" else "consistency"
    stage = s.first_stage if index % 2 == 0 else other
    p = 1.0 if index == 0 else _progress(step, index * period, s.transition_steps)
    lpips, csd, cons = _weights(stage, p, w)
    return StepPlan(step, stage, w.l2, lpips, csd, cons, p)


def plan(step: int, schedule: ScheduleConfig, weights: LossWeightsConfig) -> StepPlan:
    """The stage and loss weights of optimizer step `step` (counted from 0)."""
    if step < 0:
        raise ValueError(f"step must be >= 0; got {step}")
    if schedule.kind == "reference":
        return _reference(step, schedule, weights)
    return _periodic(step, schedule, weights)


def switches(schedule: ScheduleConfig, max_steps: int) -> list[tuple[int, str]]:
    """(first step, stage) of every stage that starts before max_steps, step 0 included."""
    if schedule.kind == "reference":
        q1, q1f = schedule.quality_iter, schedule.quality_iter_1_final
        starts = [0, q1 + 1, q1f + 1, q1f + schedule.quality_iter_2 + 1]
    else:
        starts = [
            0,
            *range(schedule.alternation_period + 1, max_steps, schedule.alternation_period),
        ]
    return [(s, plan(s, schedule, LossWeightsConfig()).stage) for s in starts if s < max_steps]
