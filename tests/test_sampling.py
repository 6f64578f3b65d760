"""The one sampling loop (`storymem_rt.sampling`): the expert switch, CFG modes, and the non-finite check."""
from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from storymem_rt.errors import NonFiniteLatentError
from storymem_rt.sampling import Guidance, expert_at, sample
from storymem_rt.schedulers import make_scheduler


class _Expert:
    """A linear stand-in for a DiT: v = a * x + (text mean), recording its calls."""

    def __init__(self, name, a, log, nan_at=None):
        self.name, self.a, self.log, self.nan_at = name, a, log, nan_at

    def __call__(self, x, t, context, y=None, frame_pos=None):
        self.log.append((self.name, float(t[0]), x.shape[0]))
        out = self.a * x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) * torch.ones_like(x)
        if self.nan_at is not None and len([c for c in self.log if c[0] == self.name]) == self.nan_at:
            out = out * float("nan")
        return out


def _run(cfg="batched", steps=10, boundary=0.9, nan=None, solver="unipc"):
    log = []
    experts = {"high": _Expert("high", 0.5, log, nan if nan and nan[0] == "high" else None),
               "low": _Expert("low", -0.25, log, nan[1] if nan and nan[0] == "low" else None)}
    if nan and nan[0] == "high":
        experts["high"].nan_at = nan[1]
    sched = make_scheduler(solver, steps, 4.0, 1000, device="cpu")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 2, 3, 3, generator=g)
    ctx, null = torch.ones(1, 3, 8), torch.zeros(1, 3, 8)
    out = sample(experts, sched, noise, g, ctx, null, None, None, Guidance(2.0, 3.0, cfg), boundary=boundary)
    return out, log, sched


def test_expert_switch_follows_the_boundary():
    _, log, sched = _run(cfg="batched", steps=12)
    want = [expert_at(float(t), 0.9) for t in sched.timesteps]
    assert [c[0] for c in log] == want and "high" in want and "low" in want
    assert all(c[2] == 2 for c in log)  # batched: one call of batch 2 per step


def test_cfg_modes_agree_and_off_is_the_conditional_branch():
    a, _, _ = _run("batched")
    b, log, _ = _run("sequential")
    assert rel_err(b, a) < 1e-6 and len(log) == 20
    off, log, _ = _run("off")
    assert len(log) == 10 and all(c[2] == 1 for c in log)
    assert rel_err(off, a) > 1e-3  # guidance changes the result; off really skips it


def test_sample_runs_any_step_count_of_both_solvers():
    for solver in ("unipc", "dpm++"):
        for steps in (1, 2, 3):
            out, _, _ = _run(steps=steps, solver=solver)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("expert,call", [("high", 1), ("low", 3)])
def test_non_finite_latent_names_step_and_expert(expert, call):
    with pytest.raises(NonFiniteLatentError) as e:
        _run(nan=(expert, call), steps=12)
    _, log, sched = _run(steps=12)
    names = [expert_at(float(t), 0.9) for t in sched.timesteps]
    step = [i for i, n in enumerate(names) if n == expert][call - 1]
    assert e.value.step == step + 1 and e.value.expert == expert  # 1-based: the step after which it was bad
    assert f"step {step + 1} of 12" in str(e.value) and f"{expert}-noise expert" in str(e.value)
