"""Distillation methods: ``embedding/`` (sentence embeddings) and ``llm/`` (causal LMs)."""
