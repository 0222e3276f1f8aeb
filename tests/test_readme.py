"""The README's quick start is the example file, and it runs as written."""

import pathlib
import re
import subprocess
import sys

from helpers import HANG_GUARD_S

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_quick_start_is_the_example_file():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python block"
    assert blocks[0] == (ROOT / "examples" / "quickstart.py").read_text()


def test_quick_start_runs_and_lowers_the_loss():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert result.returncode == 0, result.stderr
    losses = [float(v) for v in re.findall(r"train loss ([\d.]+)", result.stdout)]
    assert len(losses) == 4
    assert losses[-1] < losses[0]
