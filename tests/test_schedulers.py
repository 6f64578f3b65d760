"""Flow-matching solvers against the reference `sched-*` goldens (CPU, float32).

Solver, steps and shift come from each file's safetensors metadata (falling back to its name),
so any fixture set in the same format is picked up unchanged.
"""
from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import golden_dir, rel_err
from storymem_rt.schedulers import SOLVERS, dpmpp_sigmas, make_scheduler, unipc_sigmas

TOL = 1e-5
_NAME = re.compile(r"^sched-(?P<solver>[a-z+]+)-(?P<steps>\d+)steps-shift(?P<shift>[0-9.]+)\.safetensors$")
_SOLVER_NAMES = {"unipc": "unipc", "dpmpp": "dpm++", "dpm++": "dpm++"}


def _golden_files() -> list[str]:
    names = sorted(p.name for p in golden_dir().glob("sched-*.safetensors"))
    return names or ["missing-fixtures"]


def _case(golden, name: str) -> tuple[str, int, float, dict[str, torch.Tensor]]:
    path = golden / name
    if not path.is_file():
        pytest.fail(f"no sched-* goldens in {golden}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    m = _NAME.match(name)
    solver = meta.get("solver") or (m and m["solver"])
    steps = meta.get("steps") or (m and m["steps"])
    shift = meta.get("shift") or (m and m["shift"])
    assert solver and steps and shift, f"{name}: neither metadata nor file name give solver/steps/shift"
    assert int(meta.get("num_train_timesteps", 1000)) == 1000
    return _SOLVER_NAMES[solver], int(steps), float(shift), load_file(str(path))


@pytest.mark.parametrize("name", _golden_files())
def test_schedule_matches_golden(golden, name):
    solver, steps, shift, g = _case(golden, name)
    s = make_scheduler(solver, steps, shift)
    assert s.timesteps.dtype == torch.int64 and s.timesteps.shape == (steps,)
    assert s.sigmas.dtype == torch.float32 and s.sigmas.shape == (steps + 1,)
    # Timesteps are integers the DiT sees: they must be equal, not close.
    assert torch.equal(s.timesteps.float(), g["timesteps"].float()), (s.timesteps, g["timesteps"])
    assert rel_err(s.sigmas, g["sigmas"]) <= TOL


@pytest.mark.parametrize("name", _golden_files())
def test_steps_match_golden(golden, name):
    solver, steps, shift, g = _case(golden, name)
    s = make_scheduler(solver, steps, shift)
    x = g["x0"]
    errs = []
    for i, t in enumerate(s.timesteps):
        x = s.step(g[f"model_output_{i:02d}"], t, x)
        errs.append(rel_err(x, g[f"sample_{i:02d}"]))
    worst = int(np.argmax(errs))
    assert max(errs) <= TOL, f"{name}: step {worst} rel err {errs[worst]:.3g}"
    assert f"sample_{steps:02d}" not in g  # every golden step was checked


def test_unknown_solver_is_a_value_error():
    with pytest.raises(ValueError, match="unknown solver 'euler'.*unipc, dpm\\+\\+"):
        make_scheduler("euler", 10, 5.0)
    with pytest.raises(ValueError, match="num_steps"):
        make_scheduler("unipc", 0, 5.0)
    with pytest.raises(ValueError, match="shift"):
        make_scheduler("dpm++", 10, 0.0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_step_protocol(solver):
    s = make_scheduler(solver, 3, 5.0, step_list=(1000, 600, 200))
    x = torch.randn(1, 4, 2, 3, 3)
    if solver != "distill":  # the distill sampler takes its steps in order, whatever the caller's t
        with pytest.raises(ValueError, match="not in this scheduler's timesteps"):
            s.step(torch.randn_like(x), 12345, x)
    with pytest.raises(ValueError, match="same shape"):
        s.step(torch.randn(1, 4), s.timesteps[0], x)
    for t in s.timesteps:
        x = s.step(torch.randn_like(x), t, x)
    with pytest.raises(ValueError, match="already taken all 3 steps"):
        s.step(torch.randn_like(x), s.timesteps[-1], x)


@pytest.mark.parametrize("solver", SOLVERS)
def test_exact_flow_lands_on_x0(solver):
    """With the true flow v = noise - x0 every solver step stays on the straight path, so the final
    sample is x0 (first-order last step: x = x0_pred)."""
    torch.manual_seed(1)
    x0, noise = torch.randn(2, 16, 3, 4, 6, dtype=torch.float64), torch.randn(2, 16, 3, 4, 6, dtype=torch.float64)
    s = make_scheduler(solver, 12, 5.0)
    x = (1 - s.sigmas[0].double()) * x0 + s.sigmas[0].double() * noise
    for t in s.timesteps:
        x = s.step(noise - x0, t, x)
    assert rel_err(x, x0) < 1e-6


def test_dpmpp_schedule_formula():
    n, shift = 7, 3.0
    s = np.linspace(1, 0, n + 1)[:n]
    np.testing.assert_array_equal(dpmpp_sigmas(n, shift), shift * s / (1 + (shift - 1) * s))
    assert dpmpp_sigmas(n, shift)[0] == 1.0  # DPM++ starts from pure noise; UniPC does not
    assert unipc_sigmas(n, shift)[0] < 1.0


def _diffusers_unipc(steps: int, shift: float):
    """diffusers' UniPC (bh2, order 2, flow prediction) fed Wan's pre-shift sigmas; skips the test where
    this diffusers' `set_timesteps` takes no sigmas."""
    from diffusers import UniPCMultistepScheduler

    if "sigmas" not in inspect.signature(UniPCMultistepScheduler.set_timesteps).parameters:
        pytest.skip("this diffusers' UniPCMultistepScheduler.set_timesteps takes no sigmas")
    ref = UniPCMultistepScheduler(num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
                                  use_flow_sigmas=True, flow_shift=shift, predict_x0=True, solver_type="bh2",
                                  lower_order_final=True)
    sigma_max = float(torch.tensor(0.999, dtype=torch.float32))
    ref.set_timesteps(sigmas=np.linspace(sigma_max, 0, steps + 1)[:-1])
    return ref


def test_unipc_matches_diffusers_given_wan_sigmas():
    """diffusers' UniPC has the same step math; it matches once fed Wan's pre-shift sigmas
    (a `set_timesteps(sigmas=...)` keyword that older diffusers releases lack)."""
    steps, shift = 10, 5.0
    ref = _diffusers_unipc(steps, shift)
    ours = make_scheduler("unipc", steps, shift)
    assert torch.equal(ours.timesteps, ref.timesteps.long())
    x_ours = x_ref = torch.randn(1, 16, 2, 4, 4)
    for t in ours.timesteps:
        v = torch.randn_like(x_ours)
        x_ours = ours.step(v, t, x_ours)
        x_ref = ref.step(v, t, x_ref).prev_sample
    assert rel_err(x_ours, x_ref) <= 1e-6


# Every step count `--sample-steps` allows (1..MAX_SAMPLE_STEPS), at the shifts a render uses
# (T2V 12, M2V 4): all of 1..130 (the repeated first timestep starts at 92 with shift 12), then a
# stride through the rest and the maximum. A full sweep of 1..1000 takes minutes on 2 cores.
_STEP_COUNTS = sorted({*range(1, 131), *range(131, 1001, 97), 334, 335, 336, 1000})


@pytest.mark.parametrize("solver", [s for s in SOLVERS if s != "distill"])  # distill: its step list decides
def test_every_allowed_step_count_runs(solver):
    from storymem_rt.configs import MAX_SAMPLE_STEPS

    assert max(_STEP_COUNTS) == MAX_SAMPLE_STEPS
    for shift in (12.0, 4.0):
        for n in _STEP_COUNTS:
            s = make_scheduler(solver, n, shift)
            x = torch.ones(1, 2, 1, 1)
            for t in s.timesteps:
                x = s.step(torch.full_like(x, 0.5), t, x)
            assert s.step_index == n and torch.isfinite(x).all(), (shift, n)


def test_repeated_first_timestep_starts_at_step_zero():
    """From 92 UniPC steps at shift 12 the int64 timesteps start 999, 999: the run must still take
    step 0 first (Wan's lookup took the second hit and crashed on the last step)."""
    s = make_scheduler("unipc", 92, 12.0)
    assert s.timesteps[0] == s.timesteps[1] == 999
    x = torch.randn(1, 4, 2, 2)
    s.step(torch.randn_like(x), s.timesteps[0], x)
    assert s.step_index == 1
    with pytest.raises(ValueError, match="starts at the first timestep 999, got 998"):
        make_scheduler("unipc", 92, 12.0).step(torch.randn_like(x), 998, x)


def test_unipc_matches_diffusers_with_repeated_first_timestep():
    """Past 92 steps at shift 12: equal to diffusers' UniPC pinned to begin index 0 (what its
    pipelines do), at every step."""
    steps, shift = 100, 12.0
    ref = _diffusers_unipc(steps, shift)
    ref.set_begin_index(0)
    ours = make_scheduler("unipc", steps, shift)
    assert torch.equal(ours.timesteps, ref.timesteps.long()) and ours.timesteps[1] == 999
    x_ours = x_ref = torch.randn(1, 16, 2, 4, 4)
    for t in ours.timesteps:
        v = torch.randn_like(x_ours)
        x_ours = ours.step(v, t, x_ours)
        x_ref = ref.step(v, t, x_ref).prev_sample
        assert rel_err(x_ours, x_ref) <= 1e-6
