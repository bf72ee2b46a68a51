"""Cross-tokenizer causal-LM distillation methods; importing this package registers them."""

from lmdistill.methods.llm import dskd, mined, multilevel_ot, sft, sra, uld  # noqa: F401
from lmdistill.methods.llm.base import LMMethod, Side

__all__ = ["LMMethod", "Side"]
