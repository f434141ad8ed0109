"""pmap and shard_map across processes, and ``python -m statemap.launch``, with real processes.

Each test starts a job of 2 or 4 worker processes on this machine (JAX's
gloo CPU collectives over loopback) under a hard deadline. The workers'
script, and the sitecustomize.py modules that make a worker fail as it
starts, are in tests/multihost/. Starting JAX costs a process about 3 CPU s,
so the launcher runs in this process, where JAX is already imported, except
in one test, which runs ``python -m statemap.launch`` as a user does, and
jobs are combined where each claim is still checked on its own.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

import statemap
import statemap.launch
from helpers import lane_keys

sys.path.insert(0, str(pathlib.Path(__file__).parent / "multihost"))
import scale_out  # noqa: E402  (a worker script, importable for the reference run)

SCRIPTS = pathlib.Path(__file__).parent / "multihost"
DEADLINE = 150  # seconds for one whole job; a hang fails the test instead of the suite


def launch_module(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``python -m statemap.launch ARGS`` with a clean XLA_FLAGS (conftest's 8 devices stay here)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    command = [sys.executable, "-m", "statemap.launch", *args]
    return subprocess.run(command, env={**clean, **env}, capture_output=True, text=True, timeout=DEADLINE)


def launch(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``statemap.launch.main(ARGS)`` in this process: its exit code, stdout and stderr.

    The launcher sets each worker's devices itself (conftest's XLA_FLAGS do
    not reach them); it runs in a thread so that a hang fails the test.
    """
    capsys.readouterr()
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(statemap.launch.main(list(args))), daemon=True)
    runner.start()
    runner.join(DEADLINE)
    assert result, f"the launch did not end within {DEADLINE} s"
    out, err = capsys.readouterr()
    return result[0], out, err


def pythonpath(directory: str) -> str:
    """``PYTHONPATH`` with ``tests/multihost/DIRECTORY`` (its sitecustomize.py) first."""
    return os.pathsep.join([str(SCRIPTS / directory), os.environ.get("PYTHONPATH", "")])


def reference(mapping: object, lanes: int) -> dict[str, np.ndarray]:
    """The same training on one process with ``lanes`` devices."""
    x, y = scale_out.batch(lanes)
    _, (w, loss, *_), outs = scale_out.train(mapping, x, y, devices=jax.devices()[:lanes])
    return {
        "w": np.asarray(w.value),
        "loss": np.asarray(loss.value),
        "noise": np.stack([np.asarray(o[0]) for o in outs], axis=1),
        "count": np.stack([np.asarray(o[1]) for o in outs], axis=1),
    }


def oracle(lanes: int) -> dict[str, np.ndarray]:
    """Pure JAX: full-batch SGD, and lane i's draw from ``fold_in(base, i)`` (docs/randomness.rst)."""
    x, y = scale_out.batch(lanes)
    w, loss, noise = np.zeros(scale_out.FEATURES, np.float32), np.zeros(lanes, np.float32), []
    parent = statemap.RandomState(0).value
    for _ in range(scale_out.STEPS):
        err = x @ w - y
        w = w - 0.1 * (err[:, None] * x).mean(0)
        loss = loss + err**2
        parent, keys = lane_keys(parent, lanes)
        noise.append([jax.random.uniform(jax.random.split(k)[1], ()) for k in keys])
    return {"w": w, "loss": loss, "noise": np.asarray(noise).T}


def check_training(outdir: pathlib.Path, out: str, devices: int, names: list[str]) -> None:
    """A 2-process job's saved results equal one process's and the pure-JAX oracle's."""
    assert sorted(re.findall(r"^\[(\d)\] process \1: checked$", out, re.M)) == ["0", "1"], out
    lanes = 2 * devices
    expected = oracle(lanes)
    for name in names:
        got = dict(np.load(outdir / f"{name}.npz"))
        one_process = reference(scale_out.MAPPINGS[name], lanes)
        for key in one_process:
            np.testing.assert_allclose(got[key], one_process[key], rtol=1e-6, err_msg=f"{name}: {key}")
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=f"{name}: {key}")
        assert len(np.unique(got["noise"])) == got["noise"].size  # every lane of every step its own key
        np.testing.assert_array_equal(got["count"], lanes)
        np.testing.assert_array_equal(got["gathered"], np.broadcast_to(scale_out.batch(lanes)[1], (devices, lanes)))


def test_training_across_processes_equals_one_process(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    names = ["pmap", "shard_map"]
    script = str(SCRIPTS / "scale_out.py")
    code, out, err = launch(capsys, "-n", "2", "--local-devices", "2", script, str(tmp_path), *names)
    assert code == 0, out + err
    check_training(tmp_path, out, 2, names)


def test_one_device_a_process_then_a_raising_worker_fails_the_launch(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    # One job (each worker starts JAX, about 3 CPU s) for two claims: shard_map with one
    # device a process (the launcher's default) trains as one process does; then worker 1
    # raises while worker 0 waits for it in JAX's shutdown, which fails the launch.
    script = str(SCRIPTS / "scale_out.py")
    code, out, err = launch(capsys, "-n", "2", script, str(tmp_path), "shard_map", "raise")
    assert code == 1, out + err
    check_training(tmp_path, out, 1, ["shard_map"])
    assert f"worker 1 of 2 ({script}) failed with exit code 1; the other workers were stopped" in err
    assert "[1] worker 1 about to fail" in out and "  [1] worker 1 about to fail" in err  # echoed; the tail
    assert "RuntimeError: worker 1 gives up" in err


def test_a_killed_worker_fails_a_4_process_launch_run_as_python_m_statemap_launch() -> None:
    # The one launch from the command line: the module's entry point, its exit code and output.
    # Worker 1 kills itself as it starts (tests/multihost/dies), and workers 0, 2 and 3 are
    # stopped while they start: 4 processes for the price of none starting JAX.
    script = str(SCRIPTS / "scale_out.py")
    job = launch_module("-n", "4", script, env={"PYTHONPATH": pythonpath("dies")})
    assert job.returncode == 128 + 9, job.stdout + job.stderr
    assert f"worker 1 of 4 ({script}) was killed by signal SIGKILL" in job.stderr
    assert "the other workers were stopped" in job.stderr
    assert "[1] worker 1 about to fail" in job.stdout and "  [1] worker 1 about to fail" in job.stderr


def test_a_worker_that_never_starts_fails_the_launch_after_the_timeout(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", pythonpath("late"))  # worker 1 sleeps instead of joining
    code, out, err = launch(capsys, "-n", "2", "--timeout", "2", str(SCRIPTS / "scale_out.py"))
    assert code == 128 + 6, out + err
    assert "worker 0 of 2" in err and "SIGABRT" in err
    assert "a worker did not join" in err and "--timeout 2 s" in err


def test_launch_arguments(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    with pytest.raises(SystemExit) as stop:
        statemap.launch.main(["--help"])
    assert stop.value.code == 0
    assert "--local-devices K" in capsys.readouterr().out
    for argv, message in [
        (["-n", "2", str(tmp_path / "missing.py")], "no script"),
        (["-n", "0", "x.py"], "must be positive"),
        ([str(tmp_path)], "required: -n"),
    ]:
        with pytest.raises(SystemExit) as stop:
            statemap.launch.main(argv)
        assert stop.value.code == 2
        assert message in capsys.readouterr().err
