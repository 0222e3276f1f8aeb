"""The runner: data sets, workloads, ``train(config) -> RunResult`` and its run directories (SPEC §5, §6).

- :mod:`~sweeps.runner.data`: the data sets and their splits;
- :mod:`~sweeps.runner.curves`: the generator of the CURVES images (a stand-in);
- :mod:`~sweeps.runner.text`: the ``fortunes`` text and synthetic token streams;
- :mod:`~sweeps.runner.workloads`: models and losses;
- :mod:`~sweeps.runner.resnet`, :mod:`~sweeps.runner.language_model`: the
  networks of the ``resnet`` and ``transformer`` workloads;
- :mod:`~sweeps.runner.config`: :class:`RunConfig`, what defines a run, and
  the name of its directory;
- :mod:`~sweeps.runner.precision`: the arithmetic a run's forward runs in
  (fp32, or bf16 autocast) and what it sets for its optimizer;
- :mod:`~sweeps.runner.train`: the training loop (time, evaluation, budget);
- :mod:`~sweeps.runner.contract`: what the runner reads from an optimizer, and the defaults;
- :mod:`~sweeps.runner.run_directory`: reading and writing run directories.

Imports ``locoprop``, ``baselines`` and :mod:`sweeps.schema`; never
:mod:`sweeps.search`, :mod:`sweeps.commands` or ``analysis``.
"""

from sweeps.runner.config import RunConfig, config_digest, run_dir_name
from sweeps.runner.data import Dataset, load_dataset
from sweeps.runner.train import RunExists, RunResult, train

__all__ = ["Dataset", "RunConfig", "RunExists", "RunResult", "config_digest", "load_dataset", "run_dir_name", "train"]
