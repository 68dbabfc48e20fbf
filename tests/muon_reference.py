"""torch-side references for Muon's registry rows and tests (tests/registry.py, tests/test_muon.py).

torch.optim.Muon takes 2-D parameters only, while the registry's batteries build params with
biases and scalars (``mlp_problem``, ``nested_params``). The ``funcopt.muon`` rows therefore
leave the other leaves where they are on both sides: :func:`other_leaves_frozen` routes them to
``funcopt.set_to_zero()`` (the row's ``route``) and :class:`MuonOnMatrices` gives torch.optim.Muon
only the 2-D params. Freezing rather than AdamW keeps the float32 parity check meaningful:
Muon's bfloat16 Newton-Schulz turns a one-ulp difference anywhere in the model (AdamW's
float32 arithmetic differs from torch's by ulps) into bfloat16-ulp differences in the step
(see tests/test_muon.py). :class:`MuonAndAdamW` is the full recipe of torch's Muon docstring
(Muon for the matrices, AdamW for the rest, stepped together), for tests/test_muon.py.
"""

from __future__ import annotations

from typing import Any

import torch

import funcopt
from funcopt import tree


def _by_rank(params):
    return tree.map(lambda p: "muon" if p.ndim == 2 else "frozen", params)


def other_leaves_frozen(tx: funcopt.GradientTransformation) -> funcopt.GradientTransformation:
    """``tx`` (a Muon) for the 2-D leaves; the others keep their values (``set_to_zero``)."""
    return funcopt.multi_transform({"muon": tx, "frozen": funcopt.set_to_zero()}, _by_rank)


class MuonOnMatrices(torch.optim.Optimizer):
    """torch.optim.Muon(the 2-D params, **kwargs); the other params are not optimized."""

    def __init__(self, params, **muon_kwargs: Any) -> None:
        params = list(params)
        self.muon = torch.optim.Muon([p for p in params if p.ndim == 2], **muon_kwargs)
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        return loss


class MuonAndAdamW(torch.optim.Optimizer):
    """torch.optim.Muon(2-D params, **muon_kwargs) and torch.optim.AdamW(the others, **adamw), stepped together."""

    def __init__(self, params, adamw: dict[str, Any] | None = None, **muon_kwargs: Any) -> None:
        params = list(params)
        self.parts = [torch.optim.Muon([p for p in params if p.ndim == 2], **muon_kwargs)]
        others = [p for p in params if p.ndim != 2]
        if others:
            self.parts.append(torch.optim.AdamW(others, **(adamw or {})))
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss
