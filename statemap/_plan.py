"""Plans: what one call signature compiles to, and how each state leaves it."""

from __future__ import annotations

import enum
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import attrs
import jax

from ._catalogue import StateIn
from ._jax_internals import vmap_batched
from ._state import State, Watcher

__all__ = ["Exit", "Plan", "StalePlan", "StateOut", "TRUSTED", "batched_outputs", "shapes_of"]


def shapes_of(value: Any) -> tuple[tuple[tuple[int, ...], Any, bool], ...]:
    """(shape, dtype, weak type) of every leaf of ``value``: what a trace depends on.

    A weakly typed value (a Python scalar) promotes differently from a strong
    one of the same dtype, so JAX traces them apart and so must a plan.
    """
    return tuple(_leaf_type(jax.typeof(x)) for x in jax.tree.leaves(value))


def _leaf_type(aval: Any) -> tuple[tuple[int, ...], Any, bool]:
    return tuple(aval.shape), aval.dtype, aval.weak_type


class StalePlan(Exception):
    """Raised while JAX retraces a plan's program for inputs it was not built for."""


class _Trusted(threading.local):
    """Whether this thread runs a program trusted to refuse inputs its plan was not built for.

    A repeated call leaves its signature check to the program's own cache
    (``jax.jit``'s): there, any retrace of a lane means other inputs, so the
    lane raises ``StalePlan`` and the call takes the long way.
    """

    active = False


TRUSTED = _Trusted()


class Exit(enum.Enum):
    """How a written (or created) state leaves the call."""

    STACKED = "stacked"
    AS_IS = "written as is"
    REFUSED = "refused"
    ADVANCED = "advanced once"


@attrs.frozen
class StateOut:
    """One state the call writes back: how, on which axis, and its output leaves."""

    ref: weakref.ref
    exit: Exit
    axis: int | None
    treedef: Any
    num_leaves: int
    is_leaf: bool = attrs.field(init=False)

    @is_leaf.default
    def _is_leaf(self) -> bool:
        # ``None`` is a leaf treedef too, with no leaves: it must be unflattened.
        return jax.tree_util.treedef_is_leaf(self.treedef) and self.treedef.num_leaves == 1

    def value(self, outs: Sequence[Any], pos: int) -> Any:
        """This state's new value from the program's outputs, starting at ``pos``."""
        return outs[pos] if self.is_leaf else self.treedef.unflatten(outs[pos : pos + self.num_leaves])


@attrs.frozen(eq=False)
class Plan:
    """Everything a warm call needs: input states, the compiled program, write-back."""

    refs: tuple[weakref.ref, ...]
    arg_refs: tuple[weakref.ref, ...]
    ins: tuple[StateIn, ...]
    state_avals: tuple[tuple[Any, ...], ...]
    outs: tuple[StateOut, ...]
    made: tuple[StateOut, ...]
    advanced: tuple[StateOut, ...]
    prototypes: tuple[State, ...]
    out_tree: Any
    out_slots: tuple[Any, ...]
    num_user_leaves: int
    program: Callable[..., Sequence[Any]]
    effects: bool
    axis_size: int
    size_origin: str
    refusal: str | None
    warnings: tuple[str, ...]
    donated_states: tuple[int, ...] = ()
    """Input positions of written states' old buffers the program may consume (see ``_donation``)."""
    returns_states: bool = attrs.field(init=False)
    returned: tuple[weakref.ref, ...] = attrs.field(init=False)

    writes: bool = attrs.field(init=False)
    # Facts a warm call would otherwise recompute every time.
    flat_ins: bool = attrs.field(init=False)
    leaf_outs: bool = attrs.field(init=False)
    checks: bool = attrs.field(init=False)
    # The states written, in output order, when each is one array and none is created.
    simple_writes: tuple[weakref.ref, ...] | None = attrs.field(init=False)

    @flat_ins.default
    def _flat_ins(self) -> bool:
        return all(entry.is_leaf for entry in self.ins)

    @leaf_outs.default
    def _leaf_outs(self) -> bool:
        return all(out.is_leaf for out in self.outs)

    @simple_writes.default
    def _simple_writes(self) -> tuple[weakref.ref, ...] | None:
        if not self.leaf_outs or self.made:
            return None
        return tuple(out.ref for out in self.outs + self.advanced)

    @checks.default
    def _checks(self) -> bool:
        return self.refusal is not None or bool(self.warnings)

    @returns_states.default
    def _returns_states(self) -> bool:
        return any(slot is not None for slot in self.out_slots)

    @returned.default
    def _returned(self) -> tuple[weakref.ref, ...]:
        return tuple(slot for slot in self.out_slots if isinstance(slot, weakref.ref))

    @writes.default
    def _writes(self) -> bool:
        return bool(self.outs or self.made or self.advanced)

    def states(self) -> list[State] | None:
        """The live input states, or None if the plan is stale.

        A plan is stale once any state it holds was garbage-collected: an input
        state, or a State the function returned without touching (a warm call
        must return that very object, and can no longer).
        """
        states = [ref() for ref in self.refs]
        # ``is``, not ``in``: a State subclass may define ``__eq__``.
        if any(s is None for s in states) or any(ref() is None for ref in self.returned):
            return None
        return states  # type: ignore[return-value]

    def values(self, watcher: Watcher | None) -> list[Any]:
        """The input states' values as ``watcher`` (None: no watcher) sees them.

        Raises:
          StalePlan: a state the plan holds was garbage-collected.
        """
        if self.returned and any(ref() is None for ref in self.returned):
            raise StalePlan()
        if watcher is None:
            try:
                return [ref()._value for ref in self.refs]  # type: ignore[union-attr]
            except AttributeError:  # a dead state's ``ref()`` is None: cheaper than testing each
                raise StalePlan() from None
        states = self.states()
        if states is None:
            raise StalePlan()
        return [watcher.read(s) for s in states]

    def inputs(self, leaves: Sequence[Any], values: Sequence[Any]) -> list[Any]:
        """The program's flat inputs: the argument ``leaves``, then every input state's leaves.

        Raises:
          StalePlan: a state's value is not the pytree the plan was built for.
        """
        inputs = list(leaves)
        for value, entry in zip(values, self.ins):
            if entry.is_leaf:
                inputs.append(value)
                continue
            flat, treedef = jax.tree.flatten(value)
            if treedef != entry.treedef:
                raise StalePlan()
            inputs += flat
        return inputs

    def fits(self, values: Sequence[Any]) -> bool:
        """Whether ``values`` (one per input state) have the structure and shapes planned for."""
        return all(shapes_of(value) == shapes for value, shapes in zip(values, self.state_avals))


def batched_outputs(
    lane_fn: Callable[..., Sequence[Any]],
    inputs: Sequence[Any],
    in_axes: tuple[int | None, ...],
    candidates: Sequence[int],
    axis_name: Hashable,
    axis_size: int,
) -> set[int]:
    """Which ``candidates`` outputs of the mapped ``lane_fn`` vary across lanes.

    JAX decides: one trace of ``jax.vmap`` under ``jax.eval_shape`` (nothing
    is compiled or run) reports which outputs carry the mapped axis, so the
    cost is one trace however many states are written, and none when every
    output is placed already (no ``candidates``).
    """
    if not candidates:
        return set()

    def pick(*xs: Any) -> list[Any]:
        outs = lane_fn(jax.lax.axis_index(axis_name), *xs)
        return [outs[i] for i in candidates]

    flags = vmap_batched(pick, inputs, in_axes, axis_name, axis_size)
    return {i for i, batched in zip(candidates, flags) if batched}
