"""SFT: cross-entropy on the response only (the floor every method adds to)."""

from __future__ import annotations

from lmdistill.methods.llm.base import LMMethod
from lmdistill.registry import register


@register("sft", kind="lm")
class SFT(LMMethod):
    """``L = CE(response)``; the teacher is not run."""

    needs_teacher = False

    def forward(self, batch, s, t, heads):
        return {"ce": heads.ce, "loss": heads.ce}
