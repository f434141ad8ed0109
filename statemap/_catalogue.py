"""The catalogue of states one lane trace reads, writes and creates."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import attrs
import jax
import numpy as np

from ._axes import StateAxes, axis_in_range, lane_aval
from ._random import RandomState, is_key
from ._state import State, Watcher, describe, label, read_through
from .errors import BatchAxisError

__all__ = ["Entry", "LaneRecorder", "SizeSources", "StateIn"]


class Entry(enum.Enum):
    """How a state's value enters a lane."""

    SPLIT = "split"
    BROADCAST = "broadcast"
    LANE_KEY = "per-lane key"


@attrs.frozen
class StateIn:
    """How one input state enters: split, broadcast or per-lane key, with per-leaf axes."""

    entry: Entry
    axis: int | None
    leaf_axes: tuple[int | None, ...]
    treedef: Any
    is_leaf: bool = attrs.field(init=False)

    @is_leaf.default
    def _is_leaf(self) -> bool:
        return jax.tree_util.treedef_is_leaf(self.treedef)


@attrs.define
class SizeSources:
    """Everything that fixes the axis size, for one call; conflicts list each source."""

    api: str
    size: int | None = None
    origin: str | None = None
    seen: list[str] = attrs.field(factory=list)

    def copy(self) -> SizeSources:
        """An independent copy, for one trace to add states to."""
        return attrs.evolve(self, seen=list(self.seen))

    def add(self, origin: str, axis: int, leaf: Any) -> None:
        """Record that ``origin`` maps ``leaf`` on ``axis``; raise if sizes disagree."""
        shape = tuple(np.shape(leaf))
        detail = f"{origin} has axis {axis} of size {shape[axis]} (shape {shape}, dtype {leaf.dtype})"
        self.add_size(f"{origin}, axis {axis}", shape[axis], detail)

    def add_size(self, origin: str, size: int, detail: str) -> None:
        """Record that ``origin`` gives ``size``; raise if sizes disagree."""
        self.seen.append(f"  * {detail}")
        if self.size is None:
            self.size, self.origin = size, origin
        elif size != self.size:
            bullets = "\n".join(self.seen)
            raise ValueError(
                f"{self.api} got inconsistent sizes for the mapped axis:\n{bullets}\n"
                f"Make every mapped argument and split state the same size along its mapped axis."
            )


class LaneRecorder(Watcher):
    """Watches the lane trace: each state first touched becomes a lane input.

    The function sees lane values (tracers) through ``read``/``write``; the
    states themselves keep their values, so a failed trace changes nothing.
    """

    def __init__(
        self,
        api: str,
        state_in_axes: StateAxes,
        sizes: SizeSources,
        parent: Watcher | None,
        arg_axes: dict[State, tuple[str, int | None]],
    ):
        self.api = api
        self.state_in_axes = state_in_axes
        self.arg_axes = arg_axes
        self.sizes = sizes
        self.parent = parent
        self.new_input: Callable[[Any], Any] | None = None
        self.inputs: dict[State, StateIn] = {}
        self.before: dict[State, Any] = {}
        self.lane_values: dict[State, Any] = {}
        self.written: dict[State, None] = {}
        self.made: dict[State, None] = {}

    def read(self, state: State) -> Any:
        if state in self.made:
            return state._value
        if state not in self.inputs:
            self._enter(state)
        return self.lane_values[state]

    def write(self, state: State, value: Any) -> None:
        if state in self.made:
            state._value = value
            return
        if state not in self.inputs:
            self._enter(state)
        self.lane_values[state] = value
        self.written[state] = None

    def created(self, state: State) -> None:
        if self.parent is not None:
            self.parent.created(state)
        self.made[state] = None

    def _check_split_keys(self, state: State, axis: int) -> None:
        value = self.before[state]
        if is_key(value):
            raise BatchAxisError(
                f"{self.api}: `state_in_axes` splits {describe(state)} on axis {axis}, but it "
                f"holds a single key. Leave it out of `state_in_axes` to give each lane its own "
                f"key, or store one key per lane (`state.value = jax.random.split(key, n)`)."
            )

    def _entry(self, state: State) -> tuple[Entry, int | None]:
        selected, axis = self.state_in_axes.match(state)
        if state in self.arg_axes:
            name, arg_axis = self.arg_axes[state]
            if selected and axis != arg_axis:
                raise BatchAxisError(
                    f"{self.api}: {describe(state)} is reached twice with different axes: "
                    f"`in_axes` maps argument {name} on axis {arg_axis}, and `state_in_axes` "
                    f"on axis {axis}. Give it one axis: change `in_axes`, or leave the state "
                    f"out of `state_in_axes`."
                )
            selected, axis = True, arg_axis
        if selected and axis is not None:
            if isinstance(state, RandomState):
                self._check_split_keys(state, axis)
            return Entry.SPLIT, axis
        if isinstance(state, RandomState) and not selected:
            if not is_key(self.before[state]):
                raise TypeError(
                    f"{self.api}: {describe(state)} does not hold a PRNG key, so it cannot "
                    f"give each lane its own key. Reseed it with `state.seed(0)`."
                )
            return Entry.LANE_KEY, None
        return Entry.BROADCAST, None

    def _enter(self, state: State) -> None:
        self.before[state] = read_through(self.parent, state)
        entry, axis = self._entry(state)
        leaves, treedef = jax.tree.flatten(self.before[state])
        leaf_axes = tuple(self._split_axis(state, axis, leaf) for leaf in leaves)
        assert self.new_input is not None
        tracers = [self.new_input(lane_aval(x, a)) for x, a in zip(leaves, leaf_axes)]
        self.inputs[state] = StateIn(entry, axis, leaf_axes, treedef)
        self.lane_values[state] = jax.tree.unflatten(treedef, tracers)

    def _split_axis(self, state: State, axis: int | None, leaf: Any) -> int | None:
        if axis is None:
            return None
        ndim = np.ndim(leaf)
        fixed = axis_in_range(axis, ndim)
        if fixed is None:
            raise BatchAxisError(
                f"{self.api}: `state_in_axes` splits {describe(state)} on axis {axis}, "
                f"which is out of range for a value of rank {ndim}. Use an axis in "
                f"[{-ndim}, {ndim}), or leave the state out of `state_in_axes` to broadcast it."
            )
        self.sizes.add(label(state), fixed, leaf)
        return fixed
