"""Smoke tests: each example runs as a user runs it, with fewer steps than its defaults.

data_parallel.py chooses its own devices (8 CPU devices), so it runs in a
fresh interpreter without this process's ``XLA_FLAGS`` (tests/conftest.py
sets 8 devices here), which shows the example gets them itself. The others
choose no devices; they run as ``__main__`` in this process, where JAX is
already imported (a fresh interpreter costs about 3 CPU s to start JAX).
"""

import importlib.util
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    """Runs ``examples/name`` with ``args`` in a fresh interpreter in ``cwd``; returns its stdout."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    # A stuck collective fails within a minute instead of hanging the test run.
    env["XLA_FLAGS"] = "--xla_cpu_collective_timeout_seconds=60"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture
def run_here(capsys, monkeypatch, tmp_path):
    """Runs ``examples/name`` with ``args`` as ``__main__`` in this process, in ``tmp_path``; returns its stdout."""

    def run(name: str, *args: str) -> str:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *args])
        capsys.readouterr()
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
        return capsys.readouterr().out

    return run


def test_ensemble_training_losses_go_down(run_here):
    out = run_here("ensemble_training.py", "--steps", "100")
    rows = [[float(v) for v in line.split()[3:]] for line in out.splitlines() if line.startswith("step")]
    assert len(rows) == 6 and all(len(row) == 4 for row in rows), out
    first, last = rows[0], rows[-1]
    assert all(b < 0.5 * a for a, b in zip(first, last)), out
    assert len(set(first)) == 4, out  # members start from their own weights


def test_data_parallel_matches_one_device(tmp_path):
    out = run_example("data_parallel.py", "--steps", "5", cwd=tmp_path)
    assert "8 lanes" in out and "cpu:7" in out, out
    diff = re.search(r"max \|parameter difference\| after 5 steps: (\S+)", out)
    assert diff is not None and float(diff.group(1)) < 1e-5, out
    losses = re.findall(r"loss on 8 devices (\S+)  on one device (\S+)", out)
    assert len(losses) == 5 and all(abs(float(a) - float(b)) < 2e-5 for a, b in losses), out


def test_spiking_ensemble_rates_differ_per_member(run_here, tmp_path):
    out = run_here("spiking_ensemble.py", "--steps", "100")
    rates = [float(r) for r in re.findall(r"member \d: (\S+) Hz", out)]
    assert len(rates) == 4 and len(set(rates)) == 4, out
    assert all(1.0 < rate < 200.0 for rate in rates), out
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: no raster plot to check")
    png = tmp_path / "spiking_ensemble.png"  # the default path, in the working directory
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", out
