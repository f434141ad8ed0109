"""What mappings need across processes (``jax.distributed``) and not in one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from ._jax_internals import fast_aval, weakly_typed

__all__ = ["WeakTypes", "global_lanes", "processes_line"]


def global_lanes(api: str, size: int | None, local: int, lanes: int, devices: str) -> int:
    """The number of lanes over every process, ``lanes``, given this process's part ``size``.

    Raises:
      ValueError: ``size`` is not this process's ``local`` number of ``devices``.
    """
    if size is not None and size != local:
        raise ValueError(
            f"{api}: the mapped axis has size {size} on process {jax.process_index()}, but each "
            f"process passes its local part under jax.distributed, and this process holds "
            f"{local} of {devices}. Pass a mapped axis of local size {local} on every process."
        )
    return lanes


def processes_line(local: int, lanes: int) -> str:
    """The ``explain()`` line saying which part of the lanes this process passes."""
    return f"processes: {jax.process_count()}; this one passes {local} of the {lanes} lanes"


class WeakTypes:
    """Which inputs of a call are weakly typed, to restore inside the mapped program.

    Across processes, ``jax.pmap`` and the global arrays ``jax.jit`` takes
    lose weak types (a value made from a Python scalar), but the lanes were
    traced with them and check them. ``record`` sees each call's inputs
    before the program does; ``restore`` runs inside it.
    """

    def __init__(self) -> None:
        self.flags: tuple[bool, ...] = ()

    def record(self, inputs: Sequence[Any]) -> None:
        self.flags = tuple(bool(getattr(fast_aval(x), "weak_type", False)) for x in inputs)

    def restore(self, inputs: Sequence[Any]) -> list[Any]:
        return [weakly_typed(x) if weak else x for x, weak in zip(inputs, self.flags)]

    def recording(self, program: Callable[..., Sequence[Any]]) -> Callable[..., Sequence[Any]]:
        """``program``, recording its inputs' weak types first."""

        def run(*inputs: Any) -> Sequence[Any]:
            self.record(inputs)
            return program(*inputs)

        return run
