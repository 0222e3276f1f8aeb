"""``locoprop compare --workloads a,b,… | --suite``: one comparison per workload, then the cross-workload report.

Every workload/data pair gets the comparison of :func:`sweeps.commands.compare.compare`, at its own compare
preset (:data:`sweeps.commands.presets.COMPARE_DEFAULTS`: batch size and training-time budget) unless the
command gives a budget or batch size for all; then :func:`analysis.suite.write_suite_report` scores them
together (targets, time to target, performance profile and score with r_max = 4, wins/ties/losses). Layout of
``out``::

    suite.json              the pairs, in order, and the settings each finished with (written first)
    WORKLOAD-DATA/          the comparison of one pair: protocol.json, tuning/, runs/, report/
    report/                 the cross-workload report: report.md, its tables and the performance profile

Resumable per workload: a pair whose comparison finished with the same settings (suite.json) is reused as it
is; any other continues its comparison, which reuses its finished runs; the cross-workload report is
written again every time.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from analysis.suite import write_suite_report
from sweeps.commands import presets
from sweeps.commands.compare import Tuning, check_optimizers, compare
from sweeps.runner import run_directory
from sweeps.runner.config import RunConfig, absent
from sweeps.runner.data import DATASETS
from sweeps.runner.train import check_fits_data
from sweeps.runner.workloads import WORKLOADS, check_data
from sweeps.schema import PRECISION, PROTOCOL

__all__ = ["SUITE", "SUITE_FILE", "pair_folder", "parse_pairs", "read_suite", "run_suite", "suite_report"]

# `--suite`: the workloads that researchers train, on two CPU cores (issue 26).
SUITE: tuple[tuple[str, str], ...] = (
    ("autoencoder", "mnist5k"),
    ("autoencoder", "fashion-mnist"),
    ("curves", "curves"),
    ("resnet", "fashion-mnist"),
    ("transformer", "fortunes"),
)
SUITE_FILE = "suite.json"
REPORT = "report"


def parse_pairs(text: str, data: str | None = None) -> list[tuple[str, str]]:
    """The pairs of ``--workloads``: comma-separated WORKLOAD or WORKLOAD/DATA, each once.

    A WORKLOAD without data takes ``data`` (``--data``) if given, else the workload's default data set; a
    WORKLOAD/DATA whose DATA differs from a given ``data`` is refused, as is an unknown name, a pair whose
    workload cannot train on its data, and a pair given twice.
    """
    pairs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise ValueError(
                f"Invalid --workloads {text!r}: an empty item; give WORKLOAD or WORKLOAD/DATA, comma-separated"
            )
        workload, _, named = item.partition("/")
        if workload not in WORKLOADS:
            raise ValueError(f"Unknown workload {workload!r} in --workloads; expected one of {', '.join(WORKLOADS)}")
        if named and named not in DATASETS:
            raise ValueError(f"Unknown data set {named!r} in --workloads; expected one of {', '.join(DATASETS)}")
        if named and data is not None and named != data:
            raise ValueError(f"--workloads names {item!r} but --data is {data!r}; give the data set once")
        pair = (workload, named or data or WORKLOADS[workload].default_data)
        check_data(*pair)
        if pair in pairs:
            raise ValueError(f"--workloads gives {'/'.join(pair)} twice; give each workload/data pair once")
        pairs.append(pair)
    return pairs


def pair_folder(out: pathlib.Path, workload: str, data: str) -> pathlib.Path:
    return pathlib.Path(out) / f"{workload}-{data}"


def pair_config(base: RunConfig, workload: str, data: str, budget_given: bool, batch_given: bool) -> RunConfig:
    """``base`` for one pair: its workload and data, and its compare preset's budget and batch size where the
    command gave none for all pairs."""
    defaults = presets.COMPARE_DEFAULTS[workload]
    config = dataclasses.replace(base, workload=workload, data=data)
    if not budget_given:
        config = dataclasses.replace(config, epochs=None, steps=None, time_budget=defaults["time_budget"])
    if not batch_given:
        config = dataclasses.replace(config, batch_size=defaults["batch_size"])
    config.validate()
    return config


def _settings(config: RunConfig, optimizers: Sequence[str], seeds: Sequence[int], tuning: Tuning | None) -> dict:
    """What a pair's comparison is: reused only where every one of these is the same (without tuning, each
    optimizer's presets too: new presets continue the pair, whose comparison prices and runs what changed)."""
    fields = {key: value for key, value in dataclasses.asdict(config).items() if key not in ("out", "step_cost")}
    if absent(PRECISION, fields[PRECISION]):  # fp32: as a suite.json of an older locoprop, which lacks it
        del fields[PRECISION]
    tuned = dataclasses.asdict(tuning) if tuning else None
    if tuned and tuned["storage"]:  # suite.json must never hold a storage URL's password
        from sweeps.search.results import mask_url

        tuned["storage"] = mask_url(tuned["storage"])
    settings = {"config": fields, "optimizers": list(optimizers), "seeds": list(seeds), "tuning": tuned}
    if tuning is None:  # runs at the presets: a pair finished at other presets is continued, not reused
        settings["presets"] = {name: presets.preset(config.workload, name) for name in optimizers}
    return json.loads(json.dumps(settings, default=str))


def read_suite(out: pathlib.Path) -> dict[str, Any] | None:
    """suite.json of a suite folder, or None where ``out`` holds none."""
    path = pathlib.Path(out) / SUITE_FILE
    return run_directory.read_json(path) if path.is_file() else None


def run_suite(
    base: RunConfig,
    pairs: Sequence[tuple[str, str]],
    optimizers: Sequence[str],
    seeds: Sequence[int],
    out: pathlib.Path,
    *,
    budget_given: bool,
    batch_given: bool,
    tuning: Tuning | None = None,
    progress: bool | None = None,
    command: str | None = None,
    run_compare: Callable[..., pathlib.Path] = compare,
) -> pathlib.Path:
    """Run (or continue) the comparison of every pair, then write the cross-workload report; returns its path.

    Every pair's settings are checked and its data loaded before the first run, so that a bad pair is refused
    before anything runs.
    """
    out = pathlib.Path(out)
    if tuning is not None:
        tuning.check(seeds)
    configs = [pair_config(base, workload, data, budget_given, batch_given) for workload, data in pairs]
    for config in configs:
        check_fits_data(config)
        check_optimizers(config, optimizers, presets.preset)
    out.mkdir(parents=True, exist_ok=True)
    stored = read_suite(out) or {}
    finished = {entry["folder"]: entry.get("finished") for entry in stored.get("pairs", [])}
    entries = [{"workload": c.workload, "data": c.data, "folder": pair_folder(out, c.workload, c.data).name,
                "finished": finished.get(pair_folder(out, c.workload, c.data).name)} for c in configs]  # fmt: skip
    suite = {"command": command, "pairs": entries}
    run_directory.write_json(out / SUITE_FILE, suite)
    for index, (config, entry) in enumerate(zip(configs, entries), start=1):
        folder = out / entry["folder"]
        settings = _settings(config, optimizers, seeds, tuning)
        label = f"workload {index} of {len(configs)}: {config.workload}/{config.data}"
        if entry["finished"] == settings and (folder / PROTOCOL).is_file():
            print(f"suite: {label} finished earlier with these settings; reused from {folder}", flush=True)
            continue
        print(f"suite: {label} -> {folder}", flush=True)
        config = dataclasses.replace(config, out=str(folder))
        run_compare(config, optimizers, seeds, folder, tuning=tuning, hparams_of=presets.preset, progress=progress,
                    command=command)  # fmt: skip
        entry["finished"] = settings
        run_directory.write_json(out / SUITE_FILE, suite)
    report = suite_report(out)
    print(f"suite: cross-workload report over {len(configs)} workload(s): {report}", flush=True)
    return report


def suite_report(out: pathlib.Path, report_out: pathlib.Path | None = None) -> pathlib.Path:
    """The cross-workload report of the suite folder ``out`` (its suite.json's pairs), in ``report_out``
    (default: out/report)."""
    out = pathlib.Path(out)
    suite = read_suite(out)
    if suite is None:
        raise ValueError(f"{out} holds no {SUITE_FILE}: not a folder of `locoprop compare --workloads/--suite`")
    folders = [out / entry["folder"] for entry in suite.get("pairs", [])]
    return write_suite_report(folders, pathlib.Path(report_out) if report_out else out / REPORT)
