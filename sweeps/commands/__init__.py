"""The ``locoprop`` command line (SPEC §7) and the jobs behind its commands.

- :mod:`~sweeps.commands.cli`: what each command does with its flags, exit statuses, one-line errors;
- :mod:`~sweeps.commands.flags`: every flag, declared once: shared flag groups and one builder per command;
- :mod:`~sweeps.commands.compare`: the main job, optimizers side by side, then a report;
- :mod:`~sweeps.commands.bench`: step time and memory per optimizer;
- :mod:`~sweeps.commands.presets`: the hyperparameters ``compare`` uses without ``--tune``.

May import everything: :mod:`sweeps.runner`, :mod:`sweeps.search`, ``analysis``.
Nothing imports it but the console script (:mod:`sweeps.__main__`).
"""
