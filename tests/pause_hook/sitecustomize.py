"""Test scaffolding for tests/test_interrupts.py: stop a real ``locoprop`` process at a known step.

A test puts this folder on PYTHONPATH (Python imports ``sitecustomize`` at start-up, in the spawned ranks
too) and sets:

- LOCOPROP_TEST_PAUSE_FILE: a file that does not exist yet;
- LOCOPROP_TEST_PAUSE_STEP: a step;
- LOCOPROP_TEST_PAUSE_RANK: the rank that pauses (default 0);
- LOCOPROP_TEST_RAISE (optional): that rank raises ValueError(this text) there instead of pausing.

The first process of that rank to finish that step writes its process id to the file and waits there
until it notes a signal (``sweeps.interrupts.pending``), or the test writes the file's name + ".go" (a
process that takes no signal itself: a Ray Tune trial), or until it is killed (SIGKILL); after two
minutes without any of them it goes on (the test has failed: it must not hang). A test waits for the file,
not for a time: whatever the machine's speed, the signal comes at that step, and the run cannot end before it.
"""

import importlib.abc
import importlib.util
import os
import pathlib
import sys
import time

MODULE = "sweeps.runner.train"


def _patch(train) -> None:
    from sweeps import interrupts

    marker = pathlib.Path(os.environ["LOCOPROP_TEST_PAUSE_FILE"])
    step, rank = int(os.environ["LOCOPROP_TEST_PAUSE_STEP"]), int(os.environ.get("LOCOPROP_TEST_PAUSE_RANK", "0"))
    original = train._Run.train_step

    def train_step(self, x, y):
        result = original(self, x, y)
        if self.step == step and self.ranks.rank == rank and not marker.exists():
            if os.environ.get("LOCOPROP_TEST_RAISE"):
                raise ValueError(os.environ["LOCOPROP_TEST_RAISE"])
            partial = marker.with_name(marker.name + ".partial")
            partial.write_text(str(os.getpid()))
            partial.replace(marker)
            go = marker.with_name(marker.name + ".go")
            deadline = time.monotonic() + 120  # a limit against a hang where the signal never comes, not a timing
            while interrupts.pending() is None and not go.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return result

    train._Run.train_step = train_step


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches the training loop when it is imported (importing it here would import torch in every process)."""

    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("LOCOPROP_TEST_PAUSE_FILE"):
    sys.meta_path.insert(0, _PatchOnImport())
