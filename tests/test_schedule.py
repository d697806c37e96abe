"""The stage schedule: boundaries, transition weights, continuity, validation."""

import pytest

from dloral.train.schedule import LossWeightsConfig, ScheduleConfig, plan, switches

W = LossWeightsConfig()  # the reference lambdas: l2 1, lpips 2, csd 1, consistency 10
REF = ScheduleConfig()  # the reference: 5000 / 13000 / 5000, transitions of 1000
L, C, K = W.lpips, W.csd, W.consistency


def weights(step, schedule=REF, w=W):
    p = plan(step, schedule, w)
    return p.l2, p.lpips, p.csd, p.consistency


def reference_formula(step):
    """The reference's if/else ladder (src/train_DLoRAL.py), with its 0.02 and 2x."""
    q1, q1f, q2, t = 5000, 13000, 5000, 1000
    if step <= q1:
        return 0, 1.0, L * 0.02, 0.0, K * 2
    if step <= q1f:
        if step <= q1 + t:
            p = (step - q1) / t
            return 1, p, L * (0.02 + p * 0.98), C * p, K * (2 - p)
        return 1, 1.0, L, C, K
    if step <= q1f + q2:
        if step <= q1f + t:
            p = (step - q1f) / t
            return 0, p, L, C, K * (1 + p)
        return 0, 1.0, L, C, K * 2
    if step <= q1f + q2 + t:
        p = (step - q1f - q2) / t
        return 1, p, L, C, K * (2 - p)
    return 1, 1.0, L, C, K


@pytest.mark.parametrize(
    "step, stage",
    [
        (0, "consistency"),
        (5000, "consistency"),
        (5001, "detail"),
        (13000, "detail"),
        (13001, "consistency"),
        (18000, "consistency"),
        (18001, "detail"),
        (50000, "detail"),
    ],
)
def test_reference_stage_at_boundaries(step, stage):
    assert plan(step, REF, W).stage == stage


@pytest.mark.parametrize(
    "step",
    [0, 2500, 5000]  # first consistency stage
    + [5001, 5500, 6000, 6001, 13000]  # detail: ramp start/middle/end, after
    + [13001, 13500, 14000, 14001, 18000]  # consistency: ramp start/middle/end, after
    + [18001, 18500, 19000, 19001, 40000],  # final detail
)
def test_reference_weights_equal_the_reference_formulas(step):
    stage, p, lpips, csd, cons = reference_formula(step)
    got = plan(step, REF, W)
    assert got.stage == ("consistency", "detail")[stage]
    assert got.transition == pytest.approx(p)
    assert got.l2 == W.l2
    assert got.lpips == pytest.approx(lpips)
    assert got.csd == pytest.approx(csd)
    assert got.consistency == pytest.approx(cons)


def test_reference_quirk_csd_reported_but_not_applied_in_second_consistency_stage():
    p = plan(15000, REF, W)
    assert p.stage == "consistency" and p.csd == C and p.lpips == L
    assert p.applied_csd == 0.0
    assert plan(20000, REF, W).applied_csd == C


def _max_jumps(schedule, steps, w=W):
    """Largest per-step change of each weight over the steps."""
    prev = weights(0, schedule, w)
    worst = [0.0] * 4
    for s in range(1, steps):
        cur = weights(s, schedule, w)
        worst = [max(m, abs(a - b)) for m, a, b in zip(worst, cur, prev, strict=True)]
        prev = cur
    return worst


def test_reference_is_continuous():
    # one ramp increment per step at most: lpips 0.98 L / T, csd C / T, consistency K / T
    _, lpips, csd, cons = _max_jumps(REF, 21000)
    t = REF.transition_steps
    assert lpips <= L * 0.98 / t + 1e-9
    assert csd <= C / t + 1e-9
    assert cons <= K / t + 1e-9


def test_reference_applied_csd_jumps_only_at_stage_switches():
    applied = [plan(s, REF, W).applied_csd for s in range(21000)]
    jumps = [s for s in range(1, 21000) if abs(applied[s] - applied[s - 1]) > C / 1000 + 1e-9]
    assert jumps == [13001, 18001]  # CSD off in the second consistency stage, back on after


def test_ablation_fields_replace_the_reference_constants():
    w = LossWeightsConfig(lpips_consistency_factor=0.5, consistency_boost=3.0)
    assert plan(0, REF, w).lpips == pytest.approx(L * 0.5)
    assert plan(0, REF, w).consistency == pytest.approx(K * 3)
    mid = plan(5500, REF, w)
    assert mid.lpips == pytest.approx(L * (0.5 + 0.5 * 0.5))
    assert mid.consistency == pytest.approx(K * (3 - 2 * 0.5))
    assert plan(13500, REF, w).consistency == pytest.approx(K * (1 + 2 * 0.5))


PER = ScheduleConfig(kind="periodic", alternation_period=50, transition_steps=10)


@pytest.mark.parametrize(
    "step, stage",
    [(0, "consistency"), (50, "consistency"), (51, "detail"), (100, "detail")]
    + [(101, "consistency"), (150, "consistency"), (151, "detail")],
)
def test_periodic_stage_at_boundaries(step, stage):
    assert plan(step, PER, W).stage == stage


def test_periodic_first_stage_detail():
    s = ScheduleConfig(
        kind="periodic", alternation_period=50, transition_steps=10, first_stage="detail"
    )
    assert [plan(i, s, W).stage for i in (0, 50, 51, 101)] == [
        "detail",
        "detail",
        "consistency",
        "detail",
    ]
    assert weights(0, s) == (W.l2, L, C, K)


@pytest.mark.parametrize("offset, p", [(1, 0.1), (5, 0.5), (10, 1.0), (30, 1.0)])
def test_periodic_ramps_are_symmetric(offset, p):
    f, b = W.lpips_consistency_factor, W.consistency_boost
    d = plan(50 + offset, PER, W)  # entering detail
    assert d.stage == "detail" and d.transition == pytest.approx(p)
    assert d.lpips == pytest.approx(L * (f + (1 - f) * p))
    assert d.csd == pytest.approx(C * p)
    assert d.consistency == pytest.approx(K * (b - (b - 1) * p))
    c = plan(100 + offset, PER, W)  # entering consistency
    assert c.stage == "consistency" and c.transition == pytest.approx(p)
    assert c.lpips == pytest.approx(L * (1 - (1 - f) * p))
    assert c.csd == pytest.approx(C * (1 - p))
    assert c.consistency == pytest.approx(K * (1 + (b - 1) * p))
    assert c.applied_csd == 0.0


def test_periodic_first_stage_is_at_its_end_weights():
    assert plan(0, PER, W).transition == 1.0
    assert weights(0, PER) == pytest.approx((W.l2, L * 0.02, 0.0, K * 2))


def test_periodic_is_continuous():
    _, lpips, csd, cons = _max_jumps(PER, 400)
    t = PER.transition_steps
    assert lpips <= L * 0.98 / t + 1e-9
    assert csd <= C / t + 1e-9
    assert cons <= K / t + 1e-9


def test_periodic_hard_switches():
    s = ScheduleConfig(kind="periodic", alternation_period=5, transition_steps=0)
    assert weights(5, s) == pytest.approx((1.0, L * 0.02, 0.0, K * 2))
    assert weights(6, s) == pytest.approx((1.0, L, C, K))
    assert plan(6, s, W).transition == 1.0
    assert weights(11, s) == pytest.approx((1.0, L * 0.02, 0.0, K * 2))


def test_switches():
    assert switches(REF, 30000) == [
        (0, "consistency"),
        (5001, "detail"),
        (13001, "consistency"),
        (18001, "detail"),
    ]
    assert switches(REF, 13001) == [(0, "consistency"), (5001, "detail")]
    assert switches(PER, 160) == [
        (0, "consistency"),
        (51, "detail"),
        (101, "consistency"),
        (151, "detail"),
    ]
    assert switches(PER, 151) == [(0, "consistency"), (51, "detail"), (101, "consistency")]
    for step, stage in switches(PER, 1000):
        assert plan(step, PER, W).stage == stage
        assert step == 0 or plan(step - 1, PER, W).stage != stage


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"kind": "cyclic"}, "schedule.kind"),
        ({"first_stage": "quality"}, "schedule.first_stage"),
        ({"kind": "periodic", "alternation_period": 0}, "schedule.alternation_period"),
        (
            {"kind": "periodic", "alternation_period": 5, "transition_steps": 6},
            "schedule.transition_steps",
        ),
        ({"transition_steps": -1}, "schedule.transition_steps"),
        ({"quality_iter": 13000}, "schedule.quality_iter_1_final"),
        ({"quality_iter": -1}, "schedule.quality_iter"),
        ({"quality_iter_2": 0}, "schedule.quality_iter_2"),
        ({"quality_iter_2": 500}, "schedule.transition_steps"),
    ],
)
def test_schedule_validation(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ScheduleConfig(**kwargs)


def test_reference_checks_do_not_apply_to_periodic():
    ScheduleConfig(kind="periodic", quality_iter=10, quality_iter_1_final=5, transition_steps=0)


@pytest.mark.parametrize("name", ["l2", "lpips", "csd", "consistency", "consistency_boost"])
def test_weight_validation(name):
    with pytest.raises(ValueError, match=f"loss.weights.{name}"):
        LossWeightsConfig(**{name: -1.0})


def test_negative_step_rejected():
    with pytest.raises(ValueError, match="step"):
        plan(-1, REF, W)
