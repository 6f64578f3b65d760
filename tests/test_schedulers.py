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


def test_unipc_matches_diffusers_given_wan_sigmas():
    """diffusers' UniPC has the same step math; it matches once fed Wan's pre-shift sigmas
    (a `set_timesteps(sigmas=...)` keyword that older diffusers releases lack)."""
    from diffusers import UniPCMultistepScheduler

    if "sigmas" not in inspect.signature(UniPCMultistepScheduler.set_timesteps).parameters:
        pytest.skip("this diffusers' UniPCMultistepScheduler.set_timesteps takes no sigmas")
    steps, shift = 10, 5.0
    ref = UniPCMultistepScheduler(num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
                                  use_flow_sigmas=True, flow_shift=shift, predict_x0=True, solver_type="bh2",
                                  lower_order_final=True)
    sigma_max = float(torch.tensor(0.999, dtype=torch.float32))
    ref.set_timesteps(sigmas=np.linspace(sigma_max, 0, steps + 1)[:-1])
    ours = make_scheduler("unipc", steps, shift)
    assert torch.equal(ours.timesteps, ref.timesteps.long())
    x_ours = x_ref = torch.randn(1, 16, 2, 4, 4)
    for t in ours.timesteps:
        v = torch.randn_like(x_ours)
        x_ours = ours.step(v, t, x_ours)
        x_ref = ref.step(v, t, x_ref).prev_sample
    assert rel_err(x_ours, x_ref) <= 1e-6
