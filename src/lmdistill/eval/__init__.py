"""Evaluation: STS Spearman, MTEB on local data, generation ROUGE-L, bits per byte."""
