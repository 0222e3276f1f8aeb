"""Baseline optimizers and the registry that names every optimizer (SPEC §7)."""
