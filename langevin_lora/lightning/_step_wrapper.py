"""A removable wrapper around a torch optimizer's ``step``, for callbacks that must act inside it.

Lightning has no hook between the closure (forward, backward, clipping) and the optimizer's update,
and a torch step pre-hook fires before Lightning's closure has computed the gradients. The wrapper
replaces ``optimizer.step`` by a bound method that hands the original ``step``, the closure and the
keyword arguments to a handler, so the handler runs the closure itself and decides what the
original step may update. It coexists with torch's LR-scheduler patch (which wraps ``step`` again)
and, once removed, passes every call through even if something wrapped on top of it.
"""
from __future__ import annotations

import types
import weakref
from typing import Any, Callable

import torch

#: ``handler(original_step, closure, kwargs) -> loss``
Handler = Callable[[Callable[..., Any], Callable[[], Any] | None, dict], Any]


class StepWrapper:
    """Install ``handler`` (a bound method, held weakly) around ``optimizer.step``; :meth:`remove` undoes it."""

    def __init__(self, optimizer: torch.optim.Optimizer, handler: Handler) -> None:
        self.optimizer = optimizer
        self._had_attr = "step" in optimizer.__dict__
        original = optimizer.step  # bound method, or an instance-level wrapper (LR scheduler, ...)
        self._original = original
        ref = weakref.WeakMethod(handler)
        active = self._active = [True]

        def step(opt_self, closure=None, **kwargs):
            fn = ref()
            if fn is None or not active[0]:
                return original(closure, **kwargs) if closure is not None else original(**kwargs)
            return fn(original, closure, kwargs)

        if hasattr(original, "_wrapped_by_lr_sched"):
            step._wrapped_by_lr_sched = True  # keep torch's "step overridden after scheduler" check quiet
        self._wrapper = types.MethodType(step, optimizer)  # bound, so torch's LR-scheduler patch can wrap it
        optimizer.step = self._wrapper

    def remove(self) -> None:
        self._active[0] = False  # pass-through even if something wrapped on top of us
        opt = self.optimizer
        if opt.__dict__.get("step") is self._wrapper:
            if self._had_attr:
                opt.step = self._original
            else:
                del opt.step
