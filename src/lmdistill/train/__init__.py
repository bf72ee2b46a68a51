"""Trainers (on transformers' Trainer) and the teacher-embedding cache."""
