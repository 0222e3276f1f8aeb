"""Experiments: workloads, the training loop, run records, sweeps and the CLI."""
