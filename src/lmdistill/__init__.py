"""lmdistill: distil language models into smaller ones.

Two methods, each with the baselines it is compared against, behind one interface:

* SRA (Span Representation Alignment): cross-tokenizer distillation of causal LMs.
* TALAS (Teacher-Anchored Layer Alignment with Sharpness-aware minimisation):
  sentence-embedding distillation.
"""

from lmdistill.errors import LmdistillError

__all__ = ["LmdistillError", "__version__"]
__version__ = "0.1.0"
