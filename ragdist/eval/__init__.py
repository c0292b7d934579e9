"""Evaluation metrics and helpers for answer quality, faithfulness and retrieval."""
