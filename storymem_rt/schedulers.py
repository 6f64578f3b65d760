"""Flow-matching multistep solvers, numerically equal to Wan2.2's samplers.

- "unipc": `wan/utils/fm_solvers_unipc.py` FlowUniPCMultistepScheduler as `text2video.py` uses it
  (`shift=1` at construction, `set_timesteps(N, shift=S)`): UniPC bh2, data (x0) prediction from
  the flow, solver order 2, lower order on the final step, no dynamic shifting.
- "dpm++": `wan/utils/fm_solvers.py` FlowDPMSolverMultistepScheduler fed the sigmas
  `S*s/(1+(S-1)*s)`, `s = linspace(1, 0, N+1)[:N]` through `retrieve_timesteps`: DPM-Solver++ 2M,
  midpoint, first order on the first and last steps.

Both use sigma in [0, 1] with x_sigma = (1 - sigma) * x0 + sigma * noise, i.e. alpha = 1 - sigma,
and the model predicts the flow v = noise - x0, so x0 = x - sigma * v.

Why not diffusers' UniPCMultistepScheduler / DPMSolverMultistepScheduler (`use_flow_sigmas=True`,
`prediction_type="flow_prediction"`)? Their step math is the same, but the schedules are not, and
they move between releases inside our `diffusers>=0.33` range:
- UniPC: Wan's schedule is `shift(linspace(sigma_max, 0, N+1)[:-1])` with
  `sigma_max = float32(0.999)`. diffusers 0.42's own flow schedule is `linspace(1, 1/1000, N+1)[:-1]`
  with the first sigma nudged by 1e-6 (rel. error ~2e-3 vs the goldens, timesteps off by up to 7);
  it reproduces Wan exactly only when Wan's pre-shift sigmas are passed via
  `set_timesteps(sigmas=...)`, a keyword that 0.35 does not have (0.35 instead computed
  `shift(linspace(0.999, 0))` by default, matching to 1 ulp).
- DPM++: `DPMSolverMultistepScheduler.set_timesteps` takes no sigmas at all and its flow schedule
  starts at sigma 0.999 instead of Wan's 1.0 (rel. error ~1e-3 per step, timesteps off by 1).
So we keep the ~150 lines of math here, pinned by the `sched-*` goldens; the tests also cross-check
UniPC against diffusers (with explicit sigmas) when the installed diffusers accepts them.

Precision mirrors Wan: the schedule is built in float64 numpy and stored as float32 sigmas (CPU)
and int64 timesteps; per-step coefficients are float32 0-dim CPU tensors (no device syncs), and
`log(0) = -inf` at the sigma = 1 / sigma = 0 ends is allowed to flow through, as in Wan.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SOLVERS = ("unipc", "dpm++", "distill")
DISTILL_STEPS = (1000, 750, 500, 250)  # LightX2V's Wan2.2 4-step list (configs/distill/wan22)


def _shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    # Same operation order as Wan (float64) so that int64 timesteps truncate identically.
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def unipc_sigmas(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> np.ndarray:
    """Wan's UniPC schedule: `[N]` float64 shifted sigmas (the trailing 0 not included).

    The end points are read back from the float32 training table, as Wan does (`sigma_max` is
    float32(1 - 1/T) = 0.99900001..., `sigma_min` is 0).
    """
    train = torch.from_numpy(1.0 - np.linspace(1, 1 / num_train_timesteps, num_train_timesteps)[::-1].copy())
    train = train.to(torch.float32)
    sigma_max, sigma_min = train[0].item(), train[-1].item()
    return _shift(np.linspace(sigma_max, sigma_min, num_steps + 1)[:-1], shift)


def dpmpp_sigmas(num_steps: int, shift: float) -> np.ndarray:
    """Wan's DPM++ schedule (`get_sampling_sigmas`): `[N]` float64, starting at sigma 1."""
    return _shift(np.linspace(1, 0, num_steps + 1)[:num_steps], shift)


class FlowMultistepScheduler:
    """State shared by both solvers. Fresh per sampling run (it remembers past model outputs).

    `timesteps` `[N]` int64 on `device` (what the DiT is fed); `sigmas` `[N+1]` float32 on CPU,
    ending in 0. `step()` must be called once per timestep, in order.
    """

    solver: str = ""
    solver_order = 2

    def __init__(self, sigmas: np.ndarray, num_train_timesteps: int, device: torch.device | str | None):
        timesteps = sigmas * num_train_timesteps
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self._timesteps_cpu = torch.from_numpy(timesteps).to(torch.int64)
        self.timesteps = self._timesteps_cpu.to(device)
        self.num_train_timesteps = num_train_timesteps
        self.num_steps = len(timesteps)
        self.step_index: int | None = None
        self.model_outputs: list[Tensor | None] = [None] * self.solver_order
        self.lower_order_nums = 0

    def __len__(self) -> int:
        return self.num_steps

    def _init_step_index(self, timestep) -> None:
        # A run starts at the first timestep: begin index 0, as diffusers' pipelines pin it with
        # `set_begin_index(0)`. Wan (and diffusers without a begin index) look the first timestep
        # up and take the *second* hit when it repeats (an img2img convention); int64 truncation
        # repeats 999 at the start from 92 UniPC steps at shift 12 (335 at shift 4), so that
        # lookup skipped step 0 and the last step ran past the schedule (an IndexError in Wan).
        t = int(timestep.item() if isinstance(timestep, Tensor) else timestep)
        if not (self._timesteps_cpu == t).any():
            raise ValueError(f"timestep {t} is not in this scheduler's timesteps {self._timesteps_cpu.tolist()}")
        first = int(self._timesteps_cpu[0])
        if t != first:
            raise ValueError(f"a sampling run starts at the first timestep {first}, got {t}; make a new scheduler")
        self.step_index = 0

    def _alpha_sigma(self, i: int) -> tuple[Tensor, Tensor]:
        sigma = self.sigmas[i]
        return 1 - sigma, sigma

    def _lambda(self, i: int) -> Tensor:
        alpha, sigma = self._alpha_sigma(i)
        return torch.log(alpha) - torch.log(sigma)  # -inf at sigma 1, +inf at sigma 0

    def _push(self, x0: Tensor) -> None:
        self.model_outputs = self.model_outputs[1:] + [x0]

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None) -> Tensor:
        """One solver step: flow prediction at `timestep` and the current sample -> next sample.

        `generator` is accepted for signature parity with Wan's call; both solvers are deterministic.
        """
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.step_index >= self.num_steps:
            raise ValueError(f"the scheduler has already taken all {self.num_steps} steps; make a new one")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output {tuple(model_output.shape)} and sample {tuple(sample.shape)} "
                             "must have the same shape")
        prev = self._step(model_output, sample)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.solver_order)
        self.step_index += 1
        return prev

    def _step(self, model_output: Tensor, sample: Tensor) -> Tensor:
        raise NotImplementedError


class FlowUniPCScheduler(FlowMultistepScheduler):
    """UniPC (B(h) = expm1(-h), "bh2"), predictor order <= 2 plus the UniC corrector.

    Matches fm_solvers_unipc.py step(): at step i > 0 the corrector first refines the sample
    using this step's x0 prediction, then the predictor moves to sigma[i+1].
    """

    solver = "unipc"

    def __init__(self, num_steps: int, shift: float, num_train_timesteps: int = 1000, device=None):
        super().__init__(unipc_sigmas(num_steps, shift, num_train_timesteps), num_train_timesteps, device)
        self.last_sample: Tensor | None = None
        self.this_order = 0

    def _step(self, model_output: Tensor, sample: Tensor) -> Tensor:
        i = self.step_index
        x0 = sample - self.sigmas[i] * model_output
        if i > 0 and self.last_sample is not None:
            sample = self._corrector(x0, self.last_sample, sample, self.this_order)
        self._push(x0)
        # lower_order_final: order 1 on the last step; warm-up: order 1 on the first.
        order = min(self.solver_order, self.num_steps - i, self.lower_order_nums + 1)
        self.this_order = order
        self.last_sample = sample
        return self._predictor(sample, order)

    def _coefficients(self, t: int, s0: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """alpha_t, sigma_t, sigma_s0, lambda_s0, h = lambda_t - lambda_s0, expm1(-h) for a step s0 -> t."""
        alpha_t, sigma_t = self._alpha_sigma(t)
        sigma_s0 = self.sigmas[s0]
        lambda_s0 = self._lambda(s0)
        h = self._lambda(t) - lambda_s0
        h_phi_1 = torch.expm1(-h)  # data prediction: hh = -h
        return alpha_t, sigma_t, sigma_s0, lambda_s0, h, h_phi_1

    def _predictor(self, x: Tensor, order: int) -> Tensor:
        i = self.step_index
        m0 = self.model_outputs[-1]
        alpha_t, sigma_t, sigma_s0, lambda_s0, h, h_phi_1 = self._coefficients(i + 1, i)
        b_h = h_phi_1  # bh2
        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        if order == 2:
            rk = (self._lambda(i - 1) - lambda_s0) / h
            d1 = (self.model_outputs[-2] - m0) / rk
            x_t = x_t - alpha_t * b_h * (0.5 * d1)  # Wan fixes rho_p = 0.5 for order 2
        return x_t.to(x.dtype)

    def _corrector(self, model_t: Tensor, last_sample: Tensor, this_sample: Tensor, order: int) -> Tensor:
        i = self.step_index
        m0 = self.model_outputs[-1]
        alpha_t, sigma_t, sigma_s0, lambda_s0, h, h_phi_1 = self._coefficients(i, i - 1)
        hh = -h
        b_h = h_phi_1  # bh2
        x_t = sigma_t / sigma_s0 * last_sample - alpha_t * h_phi_1 * m0
        d1_t = model_t - m0
        if order == 1:
            return (x_t - alpha_t * b_h * (0.5 * d1_t)).to(last_sample.dtype)
        # order 2: solve R rho = b for the two UniC weights (R = [[1, 1], [rk, 1]]).
        rk = (self._lambda(i - 2) - lambda_s0) / h
        d1 = (self.model_outputs[-2] - m0) / rk
        rks = torch.stack([rk, torch.ones_like(rk)])
        h_phi_k = h_phi_1 / hh - 1
        b = [h_phi_k / b_h]
        h_phi_k = h_phi_k / hh - 1 / 2
        b.append(h_phi_k * 2 / b_h)
        rhos_c = torch.linalg.solve(torch.stack([torch.ones_like(rks), rks]), torch.stack(b))
        rhos_c = rhos_c.to(last_sample.dtype)
        x_t = x_t - alpha_t * b_h * (rhos_c[0] * d1 + rhos_c[1] * d1_t)
        return x_t.to(last_sample.dtype)


class FlowDPMSolverPPScheduler(FlowMultistepScheduler):
    """DPM-Solver++ 2M (midpoint) on x0 predictions; first order on the first and final steps."""

    solver = "dpm++"

    def __init__(self, num_steps: int, shift: float, num_train_timesteps: int = 1000, device=None):
        super().__init__(dpmpp_sigmas(num_steps, shift), num_train_timesteps, device)

    def _step(self, model_output: Tensor, sample: Tensor) -> Tensor:
        i = self.step_index
        x0 = sample - self.sigmas[i] * model_output
        self._push(x0)
        x = sample.to(torch.float32)  # Wan upcasts the sample for the update
        alpha_t, sigma_t = self._alpha_sigma(i + 1)
        sigma_s0 = self.sigmas[i]
        h = self._lambda(i + 1) - self._lambda(i)
        phi = alpha_t * (torch.exp(-h) - 1.0)
        if self.lower_order_nums < 1 or i == self.num_steps - 1:
            prev = (sigma_t / sigma_s0) * x - phi * x0
        else:
            m1 = self.model_outputs[-2]
            r0 = (self._lambda(i) - self._lambda(i - 1)) / h
            d1 = (1.0 / r0) * (x0 - m1)
            prev = (sigma_t / sigma_s0) * x - phi * x0 - 0.5 * phi * d1
        return prev.to(x0.dtype)


def make_scheduler(
    solver: str,
    num_steps: int,
    shift: float,
    num_train_timesteps: int = 1000,
    device: torch.device | str | None = "cpu",
    step_list: tuple[int, ...] | None = None,
):
    """A fresh solver ("unipc", "dpm++" or "distill" with its `step_list`) with `.timesteps`,
    `.sigmas` and `.step()`."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if solver == "distill":
        return StepDistillScheduler(step_list or DISTILL_STEPS, shift, num_train_timesteps, device)
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift!r}")
    cls = FlowUniPCScheduler if solver == "unipc" else FlowDPMSolverPPScheduler
    return cls(int(num_steps), float(shift), num_train_timesteps, device)


class StepDistillScheduler:
    """The few-step sampler of step-distilled Wan2.2 LoRAs (LightX2V `Wan22StepDistillScheduler`).

    sigmas `shift*s / (1 + (shift-1)*s)` on `s = linspace(1, 0, T+1)[:-1]` (float64), taken at indices
    `T - t` for t in `step_list`; the DiT is fed `T * sigma` as a float32 timestep (not truncated);
    each step: `x0 = x - sigma_i * v`, then `x = x0 + sigma_{i+1} * v` (no fresh noise), the last step
    returns x0. `timesteps` [N] float32 on `device`; `sigmas` [N+1] float64 on the CPU, ending in 0.
    """

    solver = "distill"

    def __init__(self, step_list, shift: float, num_train_timesteps: int = 1000, device=None):
        steps = [int(t) for t in step_list]
        if not steps or any(t != u for t, u in zip(steps, step_list)):
            raise ValueError(f"the distill step list must hold whole timesteps, got {list(step_list)}")
        if any(not 0 < t <= num_train_timesteps for t in steps) or any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"the distill step list must decrease strictly within 1..{num_train_timesteps}, "
                             f"got {steps}")
        if not shift > 0:
            raise ValueError(f"shift must be positive, got {shift!r}")
        s = np.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1]
        table = shift * s / (1 + (shift - 1) * s)
        sig = table[[num_train_timesteps - t for t in steps]]
        self.sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]))
        self.timesteps = torch.from_numpy(sig * num_train_timesteps).to(torch.float32).to(device)
        self.step_list = tuple(steps)
        self.num_train_timesteps = num_train_timesteps
        self.num_steps = len(steps)
        self.step_index = 0

    def __len__(self) -> int:
        return self.num_steps

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None) -> Tensor:
        """One Euler step of the flow: v at sigma_i -> the sample at sigma_{i+1} (x0 after the last)."""
        i = self.step_index
        if i >= self.num_steps:
            raise ValueError(f"the scheduler has already taken all {self.num_steps} steps; make a new one")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output {tuple(model_output.shape)} and sample {tuple(sample.shape)} "
                             "must have the same shape")
        sigma, nxt = float(self.sigmas[i]), float(self.sigmas[i + 1])
        x0 = sample - sigma * model_output
        self.step_index += 1
        return x0 if i + 1 == self.num_steps else x0 + nxt * model_output
