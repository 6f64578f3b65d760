"""Where a kernel runs: Triton on a CUDA device, Triton's interpreter on the CPU, or plain torch.

Every launcher in this package asks `use_triton(tensor)`:
- a CUDA tensor runs the Triton kernel;
- a CPU tensor runs the Triton kernel under the interpreter only when `TRITON_INTERPRET=1`
  (that is how CI tests the kernels); otherwise it runs the module's torch reference, so a
  tiny model on the CPU stays fast.

`jit` is `triton.jit`, except that on a machine without CUDA it builds interpreter kernels
whatever the environment said at import time: there they are the only kind that can run, and
it spares the tests from having to import this package before anything else imports triton.
"""
from __future__ import annotations

import functools
import os

import torch
import triton


def _interpreter_only() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1" or not torch.cuda.is_available()


def jit(fn=None, **kwargs):
    def wrap(f):
        if _interpreter_only():
            from triton.runtime.interpreter import InterpretedFunction

            return InterpretedFunction(f, **kwargs)
        return triton.jit(f, **kwargs)

    return wrap if fn is None else wrap(fn)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and interpreting() and _interpreter_only()


@functools.lru_cache(maxsize=None)
def is_hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def device_supports_tma(t: torch.Tensor) -> bool:
    """TMA descriptors (and FP8/INT8 matrix instructions) need sm_90 or newer; the interpreter emulates them."""
    if t.device.type == "cpu":
        return interpreting()
    return torch.cuda.get_device_capability(t.device)[0] >= 9


def skip_launch(kernel, t: torch.Tensor) -> bool:
    """True while an interpreter kernel would see fake tensors (torch.compile / export tracing a
    `triton_op` on the CPU): the interpreter reads data, so only the output shapes are traced.
    Compiled kernels go through `wrap_triton`, which traces them into the graph instead."""
    from torch._subclasses.fake_tensor import is_fake
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction) and is_fake(t)
