"""What mappings need across processes (``jax.distributed``) and not in one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ._jax_internals import fast_aval, weakly_typed

__all__ = ["WeakTypes"]


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
