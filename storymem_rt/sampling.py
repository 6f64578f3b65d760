"""The one sampling loop: MoE expert switch, classifier-free guidance, a solver step, per shot.

`sample(...)` is what every caller runs (the shot, the bench, export's checks). What varies is
data, not a copy of the loop:
- experts: {'high', 'low'} callables with the DiT's call signature `(x, t, context, y, frame_pos)`
  (any backend of `storymem_rt.backends`), or an `activate(name)` provider that swaps weights at
  the boundary (`ExpertSlot`); the high-noise expert runs while `t >= boundary * num_train_timesteps`
  (Wan2.2 `text2video.py` / StoryMem `memory2video.py`);
- guidance (`Guidance`): scales per expert and the CFG mode: "batched" (one forward of batch 2),
  "sequential" (two forwards of batch 1 sharing the step's time embedding), or "off" (one forward,
  the conditional branch alone: distilled few-step LoRAs); a parallel mode (the two branches on two
  ranks) plugs in as another `Guidance.cfg` value through `GuidedStep`'s `combine`;
- the solver: anything with `timesteps` and `step(pred, t, latent, generator)` (`schedulers.py`);
- cuda_graph: capture each expert's step once and replay it;
- check_sync: raise if a steady step synchronises with the host (CUDA).
The loop never reads device values on the host inside a step: the schedule is read once, before
it, and the finiteness check accumulates on the device and is read at each expert's last step.
A NaN or Inf in the latent stops the shot with `errors.NonFiniteLatentError` naming the first bad
step (1-based) and its expert.

Shapes: latent [C, T, h, w] float32; context [1, Lt, text_dim]; y [C_y, T, h, w] or None.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import NonFiniteLatentError

CFG_MODES = ("batched", "sequential", "off")


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: v = uncond + scale * (cond - uncond), scale per expert."""

    scale_low: float = 3.5
    scale_high: float = 3.5
    cfg: str = "batched"
    guided: tuple[str, ...] = ("high", "low")  # the other experts run the conditional branch alone

    def __post_init__(self):
        if self.cfg not in CFG_MODES:
            raise ValueError(f"cfg must be one of {', '.join(CFG_MODES)}; got {self.cfg!r}")

    def scale(self, expert: str) -> float:
        return self.scale_high if expert == "high" else self.scale_low

    def mode(self, expert: str) -> str:
        return self.cfg if expert in self.guided else "off"


class GuidedStep:
    """The model side of one denoising step for one expert and one shot: latent [C, T, h, w] float32,
    t [1] -> guided velocity [C, T, h, w] float32.

    cuda_graph: the first call runs eagerly on a side stream (it compiles, fills the caches and picks
    kernels; its result is used); the second captures the step into a CUDA graph; later calls copy
    the inputs in and replay it."""

    def __init__(self, model, context: Tensor, context_null: Tensor | None, y: Tensor | None, frame_pos,
                 scale: float, cfg: str = "batched", *, dtype: torch.dtype | None = None,
                 cuda_graph: bool = False, pool=None):
        if cfg not in CFG_MODES:
            raise ValueError(f"cfg must be one of {', '.join(CFG_MODES)}; got {cfg!r}")
        self.model, self.cfg, self.scale = model, cfg, float(scale)
        self.dtype = dtype or getattr(model, "compute_dtype", None) or torch.float32
        texts = [context] if cfg == "off" or context_null is None else [context, context_null]
        self.ctx2 = torch.cat(texts).to(self.dtype)
        self.ctx_c, self.ctx_u = self.ctx2[:1], self.ctx2[1:]
        self.y2 = None if y is None else y.to(self.dtype)[None].expand(2, *y.shape)
        self.y1 = None if y is None else self.y2[:1]
        self.frame_pos = frame_pos
        self.shares_time = hasattr(model, "embed_time")
        self.cuda_graph, self.pool = cuda_graph, pool
        self.calls = 0
        self._graph = self._stream = None

    @property
    def steady(self) -> bool:
        """True once calls do no first-time work (compile, kernel timing, capture, cache fills)."""
        return self.calls >= (2 if self.cuda_graph else 1)

    def combine(self, cond: Tensor, uncond: Tensor) -> Tensor:
        return uncond + self.scale * (cond - uncond)

    def _eval(self, latent: Tensor, t: Tensor) -> Tensor:
        m, x = self.model, latent.to(self.dtype)
        if self.cfg == "off":
            return m(x[None], t, self.ctx_c, self.y1, self.frame_pos).float()[0]
        if self.cfg == "batched":
            out = m(x[None].expand(2, *x.shape), t.expand(2), self.ctx2, self.y2, self.frame_pos).float()
            return self.combine(out[0], out[1])
        kw = {"time_emb": m.embed_time(t, 1)} if self.shares_time else {}
        cond = m(x[None], t, self.ctx_c, self.y1, self.frame_pos, **kw).float()[0]
        uncond = m(x[None], t, self.ctx_u, self.y1, self.frame_pos, **kw).float()[0]
        return self.combine(cond, uncond)

    def __call__(self, latent: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        if not (self.cuda_graph and latent.is_cuda):
            return self._eval(latent, t)
        if self._stream is None:
            self._stream = torch.cuda.Stream(latent.device)
        if self.calls == 1:  # warm-up on the capture stream, result used
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                out = self._eval(latent, t)
            torch.cuda.current_stream().wait_stream(self._stream)
            return out
        if self._graph is None:
            self._x, self._t = latent.clone(), t.clone()
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph, pool=self.pool, stream=self._stream):
                self._out = self._eval(self._x, self._t)
        self._x.copy_(latent)
        self._t.copy_(t)
        self._graph.replay()
        return self._out.clone()


@contextlib.contextmanager
def no_host_sync(on: bool):
    """Inside, any CUDA host synchronisation (item(), .cpu(), nonzero) raises."""
    if not on:
        yield
        return
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


def expert_at(t: float, boundary: float, num_train_timesteps: int = 1000) -> str:
    """'high' while t >= boundary * num_train_timesteps (the reference's switch), else 'low'."""
    return "high" if t >= boundary * num_train_timesteps else "low"


@torch.no_grad()
def sample(experts, scheduler, noise: Tensor, generator, context: Tensor, context_null: Tensor | None,
           y: Tensor | None, frame_pos, guidance: Guidance, *, boundary: float, num_train_timesteps: int = 1000,
           dtype: torch.dtype | None = None, cuda_graph: bool = False, progress=None,
           check_sync: bool = False, check_finite: bool = True, step_factory=GuidedStep,
           boundary_step: int | None = None, counts: dict | None = None) -> Tensor:
    """Denoise `noise` [C, T, h, w] with `scheduler`; returns the final latent [C, T, h, w] float32.

    experts: {'high', 'low'} -> model, or an object with `activate(name) -> model` (ExpertSlot).
    step_factory: builds the per-expert step (GuidedStep's signature); the multi-GPU CFG-parallel
    mode passes its own. boundary_step: switch experts after that many steps instead of at the
    timestep boundary (step-distilled samplers). counts: filled with "steps" and "dit_forwards" (samples
    the DiT evaluated: 2 per guided step, 1 per unguided one)."""
    ts_host = scheduler.timesteps.detach().cpu()
    ts_dev = scheduler.timesteps.to(noise.device, torch.float32)
    pool = torch.cuda.graph_pool_handle() if cuda_graph and noise.is_cuda else None
    if boundary_step is None:
        names = [expert_at(float(t), boundary, num_train_timesteps) for t in ts_host]
    else:
        names = ["high" if i < boundary_step else "low" for i in range(len(ts_host))]
    last_of = {name: i for i, name in enumerate(names)}
    steps: dict[str, GuidedStep] = {}
    first_bad = torch.full((), -1, dtype=torch.int64, device=noise.device) if check_finite else None
    latent = noise
    for i, name in enumerate(names):
        if name not in steps:
            model = experts.activate(name) if hasattr(experts, "activate") else experts[name]
            steps[name] = step_factory(model, context, context_null, y, frame_pos, guidance.scale(name),
                                       guidance.mode(name), dtype=dtype, cuda_graph=cuda_graph, pool=pool)
        step = steps[name]
        with no_host_sync(check_sync and noise.is_cuda and step.steady):
            pred = step(latent, ts_dev[i:i + 1])
            latent = scheduler.step(pred[None], ts_host[i], latent[None], generator=generator)[0]
            if first_bad is not None:  # on the device: no sync until the expert's last step
                bad = ~torch.isfinite(latent).all()
                first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, i), first_bad)
        if first_bad is not None and i == last_of[name]:  # one host read per expert and shot
            j = int(first_bad)
            if j >= 0:
                raise NonFiniteLatentError(step=j + 1, steps=len(names), expert=names[j])
        if progress is not None:
            progress.update(1)
    if counts is not None:
        counts["steps"] = len(names)
        counts["dit_forwards"] = sum(1 if guidance.mode(n) == "off" else 2 for n in names)
    return latent
