"""SAM and ASAM (Kwon et al. 2021, "ASAM: Adaptive Sharpness-Aware Minimization") as a wrapper
over any torch optimizer. Written by hand: no maintained library offers ASAM with the
per-parameter adaptive scaling, gradient accumulation and loss-scaler handling used here.

One step, given the gradient ``g`` already accumulated over all micro-batches:

1. ``T_w = |w| + eta`` element-wise for parameters in adaptive groups (weight matrices by
   default), ``T_w = 1`` elsewhere (biases, norms) and everywhere for SAM;
2. ``eps = rho * T_w^2 g / ||T_w g||_2`` (the norm over all parameters), ``w <- w + eps``;
3. ``closure()`` recomputes the gradient at ``w + eps`` over the *same* micro-batches;
4. ``w <- w - eps``; the descent gradient (and only it) is clipped to ``max_grad_norm``;
5. the base optimizer steps with that gradient.

Mixed precision: with bf16 nothing is scaled. With fp16 the loss scaler unscales the
*ascent* gradient as usual (``scaler.step`` calls ``unscale_`` once before stepping this
wrapper); the closure's backward produces a freshly *scaled* descent gradient, which the
wrapper divides by ``grad_scale()`` itself, once (set ``grad_scale = scaler.get_scale``).
A non-finite descent gradient skips the step. So no gradient is ever unscaled twice.

Data parallel: the gradient the wrapper sees is the all-reduced one (DDP reduces in
backward), so every replica computes the same ``eps``: the perturbation is *synchronised*,
and the closure's backward all-reduces the descent gradient as well.

``interval = k`` perturbs only every k-th step (a plain base step otherwise).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim import Optimizer


class ASAM(Optimizer):
    """Adaptive SAM around ``base`` (e.g. AdamW). Param groups may set ``adaptive: False``."""

    def __init__(
        self,
        base: Optimizer,
        rho: float = 0.05,
        eta: float = 0.01,
        adaptive: bool = True,
        interval: int = 1,
        max_grad_norm: float | None = None,
        clip: str = "global",
    ) -> None:
        if clip not in ("global", "per_group", "none"):
            raise ValueError(f"clip must be global, per_group or none, got {clip!r}")
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.base = base
        self.rho, self.eta, self.adaptive = rho, eta, adaptive
        self.interval = interval
        self.max_grad_norm = None if clip == "none" else max_grad_norm
        self.clip = clip
        self.closure: Callable[[], object] | None = None  # set by a trainer that steps without one
        self.grad_scale: Callable[[], float] | None = None
        self.sam_steps = 0
        self.skipped_steps = 0
        self.skip_next = False  # set by a trainer after a non-finite loss: the next step is skipped
        super().__init__(base.param_groups, base.defaults)
        # Share, not copy, the base optimizer's groups and state (schedulers change the lr here).
        self.param_groups = base.param_groups
        self.state = base.state

    def _params(self):
        for group in self.param_groups:
            adaptive = self.adaptive and group.get("adaptive", True)
            for p in group["params"]:
                if p.grad is not None:
                    yield p, adaptive

    def _unscale(self) -> bool:
        """Divide the descent gradient by the loss scale (fp16); False when it is not finite."""
        finite = True
        inv = None if self.grad_scale is None else 1.0 / float(self.grad_scale())
        for p, _ in self._params():
            if inv is not None:
                p.grad.mul_(inv)
            finite = finite and bool(torch.isfinite(p.grad).all())
        return finite

    @torch.no_grad()
    def perturbation(self) -> dict[torch.Tensor, torch.Tensor]:
        """``eps`` for each parameter from the current gradients (not applied)."""
        scaled = []
        for p, adaptive in self._params():
            t = p.abs().add(self.eta) if adaptive else None
            scaled.append((p, t, p.grad * t if t is not None else p.grad))
        if not scaled:
            return {}
        norm = torch.norm(torch.stack([s.float().norm(2) for _, _, s in scaled]), 2)
        scale = self.rho / (norm + 1e-12)
        return {p: (s * t if t is not None else s) * scale.to(s.dtype) for p, t, s in scaled}

    def perturbs_next(self) -> bool:
        """Whether the next ``step`` is a SAM step, i.e. will call its closure (the one place the
        interval rule lives: the trainer asks here before stashing a step's micro-batches)."""
        return self.rho > 0 and (self.sam_steps + 1) % self.interval == 0

    def step(self, closure: Callable[[], object] | None = None):  # type: ignore[override]
        """One (A)SAM step; ``closure`` re-runs forward and backward on the same micro-batches."""
        closure = closure or self.closure
        self.sam_steps += 1
        if self.skip_next:
            self.skip_next = False
            self.skipped_steps += 1
            self.base.zero_grad(set_to_none=True)
            return None
        if self.sam_steps % self.interval != 0 or self.rho == 0:
            self._clip()
            return self.base.step()
        if closure is None:
            raise RuntimeError("ASAM.step needs a closure that recomputes the gradient")
        eps = self.perturbation()
        with torch.no_grad():
            for p, e in eps.items():
                p.add_(e)
        self.base.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        with torch.no_grad():
            for p, e in eps.items():
                p.sub_(e)
        if not self._unscale():
            self.skipped_steps += 1
            return loss
        self._clip()
        self.base.step()
        return loss

    def _clip(self) -> None:
        """The descent gradient to ``max_grad_norm``: over all parameters (``global``), over each
        parameter group separately (``per_group``: the student's and the projectors' norms do not
        mix), or not at all (``none``, as the TALAS authors)."""
        if not self.max_grad_norm:
            return
        groups = [self.param_groups] if self.clip == "global" else [[g] for g in self.param_groups]
        for gs in groups:
            params = [p for g in gs for p in g["params"] if p.grad is not None]
            if params:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)

    def zero_grad(self, set_to_none: bool = True) -> None:  # type: ignore[override]
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self):  # type: ignore[override]
        return {"base": self.base.state_dict(), "sam_steps": self.sam_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict) -> None:  # type: ignore[override]
        self.base.load_state_dict(state_dict["base"])
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.sam_steps = int(state_dict.get("sam_steps", 0))
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))


class SAM(ASAM):
    """Plain SAM (Foret et al. 2021): ASAM with ``T_w = 1`` everywhere."""

    def __init__(self, base: Optimizer, rho: float = 0.05, interval: int = 1, max_grad_norm: float | None = None):
        super().__init__(base, rho=rho, eta=0.0, adaptive=False, interval=interval, max_grad_norm=max_grad_norm)
