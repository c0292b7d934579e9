"""Corpus loading, chunking, QA data and the built-in dataset."""
