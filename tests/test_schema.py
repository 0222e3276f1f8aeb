"""One torch-free schema module owns the record formats (SPEC §4, §6)."""

import pathlib
import re
import subprocess
import sys

from sweeps import schema

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The literals the schema owns: file names, the sweep table's stem.
OWNED = [schema.CONFIG, schema.METRICS, schema.SUMMARY, schema.CHECKPOINT, schema.SWEEP_TABLE]


def test_the_record_names_are_written_only_in_the_schema():
    for path in [*ROOT.glob("sweeps/**/*.py"), *ROOT.glob("analysis/**/*.py")]:
        if path.name == "schema.py":
            continue
        text = path.read_text()
        for literal in OWNED:
            assert not re.search(rf"[\"']{re.escape(literal)}[\"']", text), f"{path.name} spells {literal!r} itself"


def test_analysis_and_the_schema_import_neither_torch_nor_the_runner():
    code = (
        "import sys; import sweeps.schema, analysis.load, analysis.tables, analysis.plots, analysis.report; "
        "print(sorted(m for m in ('torch', 'sweeps.runner.train', 'sweeps.runner.run_directory') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_metric_columns_of_each_kind_of_run():
    assert schema.metric_columns(classifier=False, phases=("forward_backward",)) == [
        *schema.METRIC_COLUMNS,
        "step_time_s",
        "forward_backward_time_s",
        "skipped_steps",
    ]
    columns = schema.metric_columns(classifier=True, phases=("forward_backward", "targets", "local_solve"))
    assert columns[: len(schema.METRIC_COLUMNS)] == list(schema.METRIC_COLUMNS)
    assert {*schema.CLASSIFIER_COLUMNS, "targets_time_s", "local_solve_time_s"} <= set(columns)
