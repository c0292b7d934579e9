"""Recipes: the library assembled into the jobs users run. Each reads top to bottom."""
