"""The training schedule as pure functions: learning rate, Muon's momentum, the short-window phase, and
fitting a run's length to a time budget.

    from bytelm.train.schedule import lr_scale, muon_momentum, plan_steps, replan_steps
    lr = base_lr * lr_scale(step, total_steps, warmup=50, cooldown=0.4)

Every function depends on its arguments alone, so a resumed run follows the same curves exactly. `cfg` below is
a bytelm.train.config.TrainConfig (only its fields are read).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from bytelm.train.optim import MOMENTUM, MOMENTUM_START

if TYPE_CHECKING:
    from bytelm.train.config import TrainConfig

PLAN_AT_STEP = 20  # with a time budget, steps 5..20 are timed and the run's length is fitted to the budget

# Share of the time left that each re-plan keeps unused. The stretch between two evaluations can run ~10%
# slower than the one the pace was measured on (a shared machine): a 3% margin once let a run with slow
# evaluations hit the hard stop two steps before the end of its decay.
REPLAN_MARGIN = 0.1

# Between evaluations the plan is also refitted every this share of the budget on the clock, or of the planned
# steps, whichever comes first: a slow start (compilation, another program) or a burst of load is then caught
# within a few percent of the run, not only at an evaluation that may never come (eval_every beyond the plan).
REPLAN_EVERY = 0.05
REPLAN_MIN_STEPS = 3  # fewer steps than this time the pace too coarsely to refit on


def lr_scale(step: int, total_steps: int, warmup: int, cooldown: float) -> float:
    """Learning-rate multiplier for the update that turns `step` completed steps into step + 1.

    Linear warmup over `warmup` steps, flat, then a linear decay to zero over the last `cooldown` share of
    `total_steps`.
    """
    scale = 1.0
    if warmup > 0:
        scale = min(scale, (step + 1) / warmup)
    decay_steps = int(round(cooldown * total_steps))
    if decay_steps > 0:
        scale = min(scale, (total_steps - step) / decay_steps)
    return max(scale, 0.0)


def muon_momentum(step: int, warmup: int) -> float:
    """Muon's momentum for the update after `step`: MOMENTUM_START rising linearly to MOMENTUM over `warmup` steps.

    Early on the gradient's direction changes fast, and a long momentum average (0.95 spans ~20 steps) lags
    behind it; in 1,200-step screens the warmup lowered validation bpb in both seeds (docs/training.md).
    """
    if warmup <= 0:
        return MOMENTUM
    frac = min(step / warmup, 1.0)
    return MOMENTUM_START + frac * (MOMENTUM - MOMENTUM_START)


def in_short_phase(step: int, total_steps: int, cfg: TrainConfig) -> bool:
    """Whether the update after `step` trains on --short-seq-len windows (the first --short-seq-share of steps)."""
    return cfg.short_seq_len > 0 and step < round(cfg.short_seq_share * total_steps)


def cooldown_started(step: int, total_steps: int, cooldown: float) -> bool:
    """Whether lr_scale has begun its decay for the update after `step` (the plan is fixed from then on)."""
    return total_steps - step <= int(round(cooldown * total_steps))


def _shortest_total(step: int, cooldown: float) -> int:
    """The fewest total steps whose decay has not begun before the update after `step` (lr_scale flat there)."""
    return math.ceil((step + 1) / (1 - cooldown)) if cooldown < 1 else step + 1


def plan_steps(cfg: TrainConfig, step: int, elapsed: float, per_step: float) -> int:
    """The most total steps (at most cfg.steps) that fit in what is left of cfg.time_budget.

    Evaluations are counted at (eval_batches / 3 + 2) steps each: a forward pass is about a third of a training
    step, plus the sample, the plot and the checkpoint. 3% of the budget is kept as margin. Called before the
    cooldown starts, so the schedule run so far is exactly the new total's: lr_scale is flat there.
    """
    left = 0.97 * cfg.time_budget - elapsed
    eval_cost = per_step * (cfg.eval_batches / 3 + 2)
    per_step_all_in = per_step + eval_cost / cfg.eval_every
    fit = step + int((left - eval_cost) / per_step_all_in)
    # Never so short that the cooldown would have begun before `step` (the hard budget stop still holds).
    shortest = _shortest_total(step, cfg.cooldown)
    return min(cfg.steps, max(shortest, fit))


def replan_steps(cfg: TrainConfig, step: int, elapsed: float, pace: float, asked: int) -> tuple[int, float]:
    """Refit the run to `pace`, the seconds per step measured since the last plan with evaluations, saves and
    any slowdown of the machine included, so that the learning-rate decay ends as the budget does, whether the
    machine slowed down or sped up since the last plan. Used at each evaluation and whenever replan_due. `asked`: the --steps given,
    never exceeded. REPLAN_MARGIN of the time left is kept unused. Returns (total steps, cooldown share).

    Before the decay the cooldown share is kept: the new plan is exactly a run planned with that many steps.
    Once the decay has begun, the cooldown share is refitted with the steps so that the decay goes on from
    the current learning rate, with no jump, and reaches zero at the new last step; both are saved, so
    `--resume` follows the same curve.
    """
    fit = step + int((1 - REPLAN_MARGIN) * (cfg.time_budget - elapsed) / pace)
    if not cooldown_started(step, cfg.steps, cfg.cooldown):
        shortest = _shortest_total(step, cfg.cooldown)
        return min(asked, max(shortest, fit)), cfg.cooldown
    # The decay's own factor for the next update (> 0 as step < steps), not lr_scale: in a run planned so short
    # that its decay begins inside the warmup, the warmup's smaller factor would cap the new length wrongly.
    rate = lr_scale(step, cfg.steps, 0, cfg.cooldown)
    longest = int(step / (1 - rate)) if rate < 1 else asked  # more would need a decay longer than the run
    total = min(asked, longest, max(step + 1, fit))
    # Rounded up, so the rate goes on at or just below where it was (lr_scale(step, total, ., decay / total)).
    decay = min(total, max(1, math.ceil((total - step) / rate - 1e-9)))
    return total, decay / total


def replan_due(step: int, seconds: float, mark: tuple[int, float], cfg: TrainConfig) -> bool:
    """Whether the plan is refitted after `step`: REPLAN_EVERY of the budget has passed since the last plan
    (`mark`: its step and clock time; `seconds`: the clock now), or REPLAN_EVERY of the planned steps."""
    mark_step, mark_time = mark
    since = step - mark_step
    return since >= 1 and (seconds - mark_time >= REPLAN_EVERY * cfg.time_budget
                           or since >= max(REPLAN_MIN_STEPS, REPLAN_EVERY * cfg.steps))


def median_step_time(step_times: list[float]) -> float:
    """The median of the timed steps, leaving out the first quarter (compilation, warm caches)."""
    timed = sorted(step_times[len(step_times) // 4:])
    return timed[len(timed) // 2]
