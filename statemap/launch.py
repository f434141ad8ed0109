"""Run a script as a multi-process JAX job on this machine: ``python -m statemap.launch``.

``python -m statemap.launch -n N [--local-devices K] [--timeout S] script.py [args]``
starts N worker processes, each with K CPU devices and ``jax.distributed``
already initialised (a coordinator on a free loopback port), and runs
``script.py args`` in each as ``__main__``, as ``python script.py args``
would. The script calls nothing of ``jax.distributed``: ``jax.devices()``
lists the N*K devices of the job, ``jax.local_devices()`` the K of its own
process, and ``jax.process_index()`` tells the workers apart (before JAX
starts, so do ``STATEMAP_PROCESS_ID`` and ``STATEMAP_NUM_PROCESSES`` in the
environment). This is how a program written for several hosts runs, and is
tested, on one machine.

Each line a worker prints is shown prefixed by its process index, ``[i]``.
The launch exits 0 when every worker does. When a worker fails or dies,
the others are stopped at once and the launch fails with that worker's exit
code (128 + N for a worker killed by signal N) and the tail of its output.
Nothing waits forever: a worker that does not join within ``--timeout``
seconds, or whose peers do not arrive at a collective within it, is aborted
by JAX (SIGABRT), which ends the launch.

Example:
  A data-parallel step over 2 processes with 2 devices each::

    $ cat step.py
    import jax, jax.numpy as jnp
    import statemap
    w = statemap.ParamState(jnp.zeros(()), name='w')
    @statemap.pmap(axis_name='d')
    def step(x):
        w.value = w.value + jax.lax.pmean(x, 'd')
    step(jnp.full(jax.local_device_count(), jax.process_index() + 1.0))
    print(jax.process_index(), w.value)
    $ python -m statemap.launch -n 2 --local-devices 2 step.py
    [0] 0 1.5
    [1] 1 1.5
"""

from __future__ import annotations

import argparse
import collections
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

from ._distributed import worker_environment

__all__ = ["main"]

_TAIL_LINES = 20
_READ_GRACE = 5.0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the launcher with command-line arguments ``argv`` (default: ``sys.argv[1:]``).

    Args:
      argv: ``-n N [--local-devices K] [--timeout S] script.py [args]``.

    Returns:
      0 when every worker succeeded; otherwise the exit code of the first
      worker that failed (128 + N when it was killed by signal N).

    Example:
      >>> import pathlib, tempfile
      >>> import statemap.launch
      >>> script = pathlib.Path(tempfile.mkdtemp()) / 'hello.py'
      >>> _ = script.write_text('import jax; print(jax.process_count(), jax.device_count())')
      >>> statemap.launch.main(['-n', '1', '--local-devices', '2', str(script)])
      [0] 1 2
      0
    """
    options = _parser().parse_args(argv)
    if not os.path.isfile(options.script):
        _parser().error(f"no script {options.script!r}")
    coordinator = f"127.0.0.1:{_free_port()}"
    workers = []
    try:
        for i in range(options.num_processes):
            env = worker_environment(
                os.environ,
                coordinator=coordinator,
                num_processes=options.num_processes,
                process_id=i,
                devices=options.local_devices,
                timeout=options.timeout,
            )
            workers.append(_Worker(i, [options.script, *options.args], env))
        return _supervise(workers, options)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    finally:
        _stop(workers)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m statemap.launch",
        description="Run SCRIPT in N local worker processes with jax.distributed initialised.",
    )
    parser.add_argument("-n", "--num-processes", type=_positive(int), required=True, metavar="N",
                        help="number of worker processes")
    parser.add_argument("--local-devices", type=_positive(int), default=1, metavar="K",
                        help="CPU devices per worker (default: 1)")
    parser.add_argument("--timeout", type=_positive(float), default=60.0, metavar="S",
                        help="seconds to wait for every worker to join, for a collective's "
                             "peers, and at shutdown, before JAX aborts the worker (default: 60)")
    parser.add_argument("script", help="the Python script each worker runs as __main__")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    return parser


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = getattr(kind, "__name__", "value")  # argparse names the type in errors
    return parse


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _Worker:
    """One worker process; its output is echoed with a ``[i]`` prefix and its tail kept."""

    _echo_lock = threading.Lock()

    def __init__(self, index: int, command: list[str], env: dict[str, str]):
        self.index = index
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "statemap._distributed", *command],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopping it stops its children
        )
        self.reader = threading.Thread(target=self._echo, daemon=True)
        self.reader.start()

    def _echo(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:  # closed at the end, as main may run again in this process
            for raw in self.process.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                with self._echo_lock:
                    sys.stdout.write(f"[{self.index}] {line}\n")
                    sys.stdout.flush()
                if not line.lstrip().startswith("@ 0x"):  # native stack frames of an abort
                    self.tail.append(line)

    def signal(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def _supervise(workers: list[_Worker], options: argparse.Namespace) -> int:
    """Wait for every worker; at the first failure, stop the rest and report it."""
    exits: queue.Queue[tuple[_Worker, int]] = queue.Queue()
    for worker in workers:
        threading.Thread(target=lambda w=worker: exits.put((w, w.process.wait())), daemon=True).start()
    for _ in workers:
        worker, code = exits.get()
        if code != 0:
            _stop(workers)
            worker.reader.join(timeout=_READ_GRACE)
            print(_failure(worker, code, options), file=sys.stderr)
            return code if code > 0 else 128 - code
    for worker in workers:
        worker.reader.join(timeout=_READ_GRACE)  # the last lines are shown before returning
    return 0


def _stop(workers: list[_Worker]) -> None:
    """Kill the workers still running, with their children.

    SIGKILL, not SIGTERM: ``jax.distributed`` catches SIGTERM as a preemption
    notice and keeps running.
    """
    running = [w for w in workers if w.process.poll() is None]
    for worker in running:
        worker.signal(signal.SIGKILL)
    for worker in running:
        worker.process.wait()


def _failure(worker: _Worker, code: int, options: argparse.Namespace) -> str:
    total = options.num_processes
    if code < 0:
        name = signal.Signals(-code).name
        how = f"was killed by signal {name} (exit code {code})"
    else:
        how = f"failed with exit code {code}"
    lines = [
        f"statemap.launch: worker {worker.index} of {total} ({options.script}) {how}; "
        f"the other workers were stopped."
    ]
    if code == -signal.SIGABRT:
        lines.append(
            f"JAX aborts a worker when the job's distributed runtime fails: another worker "
            f"died, a worker did not join, or a collective's peers did not arrive, within "
            f"--timeout {options.timeout:g} s."
        )
    lines.append(f"Last lines of worker {worker.index}'s output:")
    lines += [f"  [{worker.index}] {line}" for line in worker.tail] or ["  (none)"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
