"""What both sweep back ends share (SPEC §8): the study's setup, the results
table, and storage strings with their credentials masked.

- The setup of a study is the base run config every trial shares (all of
  :class:`~sweeps.runner.train.RunConfig` but the searched hyperparameters and the
  paths), stored with the study on its first run; a later command with
  another setup is refused, naming the fields that differ.
- The table has one row per evaluation of every trial, the columns of
  ``analysis.load`` plus ``trial`` and ``hp_<name>`` per hyperparameter,
  each trial labelled with the config it ran (its ``config.json``); written
  as ``sweep_results.csv`` and ``sweep_results.parquet`` in the study's
  folder, where ``locoprop report`` finds them.
- A study keeps its files in its own folder, ``--out``/STUDY (its trials'
  run directories and its table), so that studies sharing an ``--out`` never
  share a trial folder or a table; its name must therefore be a plain folder
  name (:func:`check_study_name`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import urllib.parse
import warnings
from typing import TYPE_CHECKING, Any

import pandas as pd

from sweeps import schema
from sweeps.runner import run_directory
from sweeps.runner.config import absent

if TYPE_CHECKING:
    from sweeps.runner.config import RunConfig
    from sweeps.search.search_space import SearchSpace

__all__ = [
    "JOURNAL_PREFIX",
    "TABLE_STEM",
    "SweepNotice",
    "TrialLeftOut",
    "best_trial",
    "check_same_setup",
    "check_study_name",
    "export_results",
    "hide_secrets",
    "mask_url",
    "sweep_setup",
]

TABLE_STEM = schema.SWEEP_TABLE
JOURNAL_PREFIX = "journal:"  # --storage journal:PATH names an Optuna journal file
# Run-config fields that are not part of a study's setup: the searched
# hyperparameters (the space's fixed ones are kept, as fixed_hparams), and
# where files live (workers on a cluster may mount the data elsewhere).
NOT_SETUP = ("hparams", "out", "data_dir")
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
QUERY_SECRET = re.compile(r"((?:^|[&;])(?:password|passwd|pwd|secret|token)=)([^&;]*)", re.IGNORECASE)


# --------------------------------------------------------------- secrets
def _split_credentials(url: str) -> tuple[str, str, str] | None:
    """``(head, password, tail)`` with ``url == head + password + tail``, or None without a password.

    Recognises ``scheme://user:password@host…`` and the scheme-less
    ``user:password@host…``. The password runs to the last ``@`` before any
    query string (a raw ``@`` in a password is taken with it); the user name
    has no ``/``, so a file path such as ``/data/a:b@c.log`` has none.
    """
    base = url.partition("?")[0]
    credentials_end = base.rfind("@")
    if credentials_end < 0:
        return None
    scheme_end = base.find("://")
    start = scheme_end + 3 if 0 <= scheme_end < credentials_end else 0
    user, colon, password = base[start:credentials_end].partition(":")
    if not colon or not password or "/" in user:
        return None
    head_end = start + len(user) + 1
    return url[:head_end], password, url[credentials_end:]


def mask_url(url: str) -> str:
    """``url`` with its password (user info or query parameter) replaced by ``***``."""
    if url.startswith(JOURNAL_PREFIX):  # journal:PATH is a file, unless PATH itself looks like a URL
        return JOURNAL_PREFIX + mask_url(url.removeprefix(JOURNAL_PREFIX))
    parts = _split_credentials(url)
    if parts is not None:
        url = f"{parts[0]}***{parts[2]}"
    base, question, query = url.partition("?")
    return base + question + QUERY_SECRET.sub(r"\1***", query)


def _secrets(url: str) -> set[str]:
    """The passwords in ``url``, as written, decoded and encoded (drivers may print any)."""
    found = {match.group(2) for match in QUERY_SECRET.finditer(url.partition("?")[2])}
    parts = _split_credentials(url)
    if parts is not None:
        found.add(parts[1])
    found |= {urllib.parse.unquote(s) for s in found} | {urllib.parse.quote(s, safe="") for s in found}
    return {s for s in found if s}


def hide_secrets(text: str, url: str) -> str:
    """``text`` (an error message about ``url``) with ``url`` masked and its password nowhere.

    The password is replaced where it stands as a whole token (not inside
    a longer word), so a short password does not garble the message.
    """
    text = text.replace(url, mask_url(url))
    for secret in sorted(_secrets(url), key=len, reverse=True):
        text = re.sub(rf"(?<![\w]){re.escape(secret)}(?![\w])", "***", text)
    return text


# ----------------------------------------------------------------- setup
def check_study_name(name: str) -> str:
    """``name`` if it can name a study's folder inside ``--out``; otherwise a ValueError naming it.

    A plain folder name: letters, digits, ``.``, ``_``, ``+`` and ``-``, starting with a letter or a digit,
    at most 128 characters; so no path separator, no ``..`` and nothing hidden can take a study's files
    outside ``--out``.
    """
    if not isinstance(name, str) or not STUDY_NAME.fullmatch(name):
        raise ValueError(
            f"Invalid --study {name!r}: a study keeps its files in --out/STUDY, so its name must be a plain folder "
            "name: letters, digits, '.', '_', '+' and '-', starting with a letter or a digit, at most 128 characters"
        )
    return name


def sweep_setup(base: RunConfig, space: SearchSpace) -> dict[str, Any]:
    """The setup every trial of a study shares, as JSON data.

    ``base`` is the trials' run config (its ``hparams`` and paths are
    ignored); the space's optimizer and fixed hyperparameters are part of
    the setup, its searched ones are not.
    """
    # A field added since (precision) counts only away from the value a study stored before it had.
    setup = {k: v for k, v in dataclasses.asdict(base).items() if k not in NOT_SETUP and not absent(k, v)}
    setup["optimizer"] = space.optimizer
    setup["fixed_hparams"] = dict(space.fixed)
    return json.loads(json.dumps(setup))  # as stored: tuples become lists


def check_same_setup(stored: dict[str, Any], current: dict[str, Any], study: str) -> None:
    """Refuse to continue ``study`` (stored with setup ``stored``) with another setup."""
    differences = run_directory.field_differences(stored, current, ("in the study", "now"))
    if differences:
        raise ValueError(
            f"{study} was run with another setup ({'; '.join(differences)}); continue it with the same flags, "
            "or choose another --study"
        )


# ------------------------------------------------------------- selection
def best_trial(table: pathlib.Path, metric: str = "valid_loss") -> dict[str, Any] | None:
    """The finished trial of an exported table with the lowest final ``metric``, or None if no trial finished.

    Only trials that ran their whole budget (status ok) compete: a pruned
    trial's loss is from part of the budget, a diverged one has none.
    Returns ``{"trial", "run_dir", "hparams", metric}``, the hyperparameters
    read from the trial's config.json (what it ran).
    """
    frame = pd.read_csv(table)
    if frame.empty or metric not in frame.columns:
        return None
    finals = frame.sort_values("step").groupby(schema.RUN_ID, sort=False).tail(1)
    finals = finals[(finals[schema.STATUS] == schema.OK) & finals[metric].notna()]
    if finals.empty:
        return None
    best = finals.loc[finals[metric].idxmin()]
    config = json.loads((pathlib.Path(best["run_dir"]) / schema.CONFIG).read_text())
    return {
        "trial": best["trial"].item() if hasattr(best["trial"], "item") else best["trial"],  # NumPy -> JSON-able
        "run_dir": best["run_dir"],
        "hparams": config["hparams"],
        metric: float(best[metric]),
    }


# ----------------------------------------------------------------- table
class SweepNotice(UserWarning):
    """What a sweep did to a damaged record, in one line that names it (the CLI prints it as such)."""


class TrialLeftOut(SweepNotice):
    """A trial whose metrics.csv is cut short or damaged was left out of the results table; the message names it."""


def export_results(trials: list[dict], study_dir: pathlib.Path) -> pathlib.Path:
    """Write the study's table for ``trials`` (dicts with ``trial``, ``run_dir`` and ``status``) in ``study_dir``
    and return the CSV path.

    Each trial is labelled from its run directory's ``config.json``: with
    the optimizer, workload, data, seed and hyperparameters it ran. A trial
    whose metrics.csv cannot be trusted (:func:`sweeps.schema.metrics_defect`)
    is left out with a :class:`TrialLeftOut` warning, never exported as if whole.
    """
    frames = [frame for frame in map(_trial_frame, trials) if frame is not None]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[schema.RUN_ID, "trial"])
    study_dir.mkdir(parents=True, exist_ok=True)
    csv_path = study_dir / f"{TABLE_STEM}.csv"
    table.to_csv(csv_path, index=False)
    table.to_parquet(study_dir / f"{TABLE_STEM}.parquet", index=False)
    _remove_shared_table(study_dir, trials)
    return csv_path


def _trial_frame(trial: dict) -> pd.DataFrame | None:
    """The rows of one trial's metrics.csv, labelled; None for a trial with nothing (or nothing sound) to show."""
    run_dir = pathlib.Path(trial["run_dir"] or "")
    metrics = run_dir / run_directory.METRICS
    if not trial["run_dir"] or not metrics.exists():
        return None  # failed before its first evaluation: nothing to plot
    config_path = run_dir / run_directory.CONFIG
    if not config_path.exists():
        raise ValueError(f"Trial {trial['trial']}: {config_path} is missing, so what the trial ran is unknown")
    config = json.loads(config_path.read_text())
    summary_path = run_dir / run_directory.SUMMARY
    try:
        summary = run_directory.read_json(summary_path) if summary_path.exists() else None
        defect = schema.metrics_defect(metrics, summary)
    except (OSError, ValueError) as err:  # a damaged summary.json, or a metrics.csv that is not text
        defect = f"cannot be checked ({err})"
    if defect is not None:
        warnings.warn(
            f"trial {trial['trial']} left out of the results table: {metrics}: {defect}; "
            "remove its run directory to run it again",
            TrialLeftOut,
            stacklevel=3,
        )
        return None
    frame = pd.read_csv(metrics)
    frame.insert(0, schema.RUN_ID, trial["trial"])
    frame.insert(1, "trial", trial["trial"])
    return frame.assign(**schema.run_labels(config, trial["status"]), run_dir=str(run_dir))


def _remove_shared_table(study_dir: pathlib.Path, trials: list[dict]) -> None:
    """Remove the table that locoprop wrote in ``--out`` for every study there (the last one's) before each study
    had its folder, when it holds only trials of this study, which the study's own table now holds: otherwise
    ``locoprop report`` would read them twice. A table with other trials is left to its owner."""
    shared = study_dir.parent / f"{TABLE_STEM}.csv"
    if not shared.is_file():
        return
    try:
        listed = set(pd.read_csv(shared)["run_dir"].astype(str))
    except (OSError, ValueError, KeyError):
        return  # not a table that a sweep wrote
    if listed <= {str(trial["run_dir"]) for trial in trials}:
        shared.unlink()
        shared.with_suffix(".parquet").unlink(missing_ok=True)
        print(f"removed {shared} (and .parquet), written by an older locoprop: the study's table is now in {study_dir}")
