"""Bodies: a stateful function traced once, for the loops, branches and gradients built on it.

A ``Body`` is what ``jax.lax.scan``, ``cond`` or ``jax.grad`` needs from a
function that reads and writes states: a pure function of its arguments and
of the states it touches, returning its outputs and the states it wrote.
The catalogue is the engine's (``LaneRecorder``), with every state entering
as it is; the transform threads the states through its JAX primitive and
writes them back with ``write_back``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import jax
import numpy as np

from ._catalogue import LaneRecorder, SizeSources, pass_through
from ._jax_internals import LaneJaxpr, LaneTrace, eval_lane, trace_lane, under_staging_trace
from ._planner import LaneOutputs, collect_outputs
from ._state import State, current_watcher, describe, drop_watcher, pop_watcher, push_watcher
from ._diagnose import baked_error, tracer_error
from ._writeback import set_value
from .errors import StateTypeError

__all__ = [
    "Body",
    "check_same_structure",
    "check_same_types",
    "sliced",
    "stays_weak",
    "strengthened",
    "trace_body",
    "write_back",
]


@attrs.frozen(eq=False)
class Body:
    """A traced stateful function: ``run(args, state_values) -> (out, written_values)``.

    Attributes:
      api: the transform's name, for messages.
      lane: the traced jaxpr; inputs are the argument leaves, then the states' leaves.
      states: the states it reads or writes, in the jaxpr's input order.
      values: each state's value outside the function, as the caller sees it.
      written: the states it writes, in output order.
      written_trees: the structure of each written value.
      out_tree: the structure of what it returns.
      num_out: how many leaves it returns.
    """

    api: str
    lane: LaneJaxpr
    states: tuple[State, ...]
    values: tuple[Any, ...]
    written: tuple[State, ...]
    written_trees: tuple[Any, ...]
    out_tree: Any
    num_out: int

    @property
    def written_avals(self) -> list[list[Any]]:
        """The avals of each written state's leaves, as the function leaves them."""
        avals, pos = [], self.num_out
        for treedef in self.written_trees:
            avals.append(self.lane.out_avals[pos : pos + treedef.num_leaves])
            pos += treedef.num_leaves
        return avals

    def value_of(self, state: State) -> Any:
        """The value ``state`` had outside the function."""
        return self.values[_index(self.states, state)]

    def run(self, args: Sequence[Any], values: Sequence[Any]) -> tuple[Any, list[Any]]:
        """Evaluate on argument leaves (States among them are skipped) and one value per state.

        Returns the output and the written states' values.
        """
        arrays = [x for x in args if not isinstance(x, State)]
        flat = [*arrays, *(leaf for value in values for leaf in jax.tree.leaves(value))]
        outs = eval_lane(self.lane, flat)
        out = jax.tree.unflatten(self.out_tree, outs[: self.num_out])
        written, pos = [], self.num_out
        for treedef in self.written_trees:
            written.append(jax.tree.unflatten(treedef, outs[pos : pos + treedef.num_leaves]))
            pos += treedef.num_leaves
        return out, written


def trace_body(api: str, fn: Callable[..., Any], args: Sequence[Any], what: str = "function") -> Body:
    """Trace ``fn(*args)`` once, where ``args`` is a tuple of pytrees of arrays or avals.

    Raises ``StatemapError`` when the call would bake state values into a raw
    JAX program (see ``baked_error``), and ``TypeError`` when ``fn`` returns
    or creates States, which a loop or branch cannot carry out.
    """
    leaves, treedef = jax.tree.flatten(tuple(args))
    # States passed as arguments reach the function as themselves, read like closed-over ones.
    avals = [_aval(x) for x in leaves if not isinstance(x, State)]
    recorder = LaneRecorder(api, pass_through, SizeSources(api), current_watcher())
    outputs = LaneOutputs()

    def body(lane: LaneTrace, tracers: Sequence[Any]) -> list[Any]:
        recorder.lane = lane
        given = iter(tracers)
        rebuilt = [x if isinstance(x, State) else next(given) for x in leaves]
        push_watcher(recorder)
        try:
            out = fn(*jax.tree.unflatten(treedef, rebuilt))
        finally:
            pop_watcher(recorder)
        _check_no_states(api, what, out, recorder)
        return collect_outputs(api, out, recorder, outputs)

    try:
        lane = trace_lane(body, avals, None, None)
    finally:
        drop_watcher(recorder)
        for state in recorder.made:
            state._value = None
    states = tuple(recorder.inputs)
    if recorder.parent is None and states and under_staging_trace():
        raise baked_error(api, states[0])
    return Body(
        api=api,
        lane=lane,
        states=states,
        values=tuple(recorder.before.values()),
        written=tuple(s for s, _, _ in outputs.written),
        written_trees=tuple(treedef for _, treedef, _ in outputs.written),
        out_tree=outputs.out_tree,
        num_out=outputs.num_user_leaves,
    )


def write_back(api: str, states: Sequence[State], values: Sequence[Any]) -> None:
    """Write ``values`` to ``states`` as the caller's watcher sees them, all or nothing."""
    watcher = current_watcher()
    if watcher is not None:
        for state, value in zip(states, values):
            watcher.write(state, value)
        return
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(list(values))):
        raise tracer_error(api, states)
    any(map(set_value, states, values))


def sliced(x: Any) -> Any:
    """The aval of one slice of ``x`` along its leading axis, as a loop body sees it."""
    aval = _aval(x)
    if not aval.shape:
        raise ValueError(f"cannot slice a scalar of type {aval}")
    return aval.update(shape=aval.shape[1:])


def strong(x: Any) -> Any:
    """``x`` without a weak type, so a loop carry keeps one type from step to step."""
    aval = _aval(x)
    return jax.lax.convert_element_type(x, aval.dtype) if aval.weak_type else x


def stays_weak(value: Any, *afters: Sequence[Any]) -> list[bool]:
    """For each leaf of a state's ``value``: weakly typed, and so in every one of ``afters`` (its leaves, or their avals).

    A carry may keep such a leaf weak, as the same Python loop would; any
    other leaf is carried strongly typed (see ``strengthened``).
    """
    before = [_aval(x).weak_type for x in jax.tree.leaves(value)]
    return [weak and all(_aval(after[i]).weak_type for after in afters) for i, weak in enumerate(before)]


def strengthened(values: Sequence[Any], weak: Sequence[Sequence[bool]]) -> list[Any]:
    """``values`` (one per state) without weak types, but for the leaves ``weak`` (from ``stays_weak``) keeps."""
    out = []
    for value, keep in zip(values, weak):
        leaves, treedef = jax.tree.flatten(value)
        out.append(jax.tree.unflatten(treedef, [x if k else strong(x) for x, k in zip(leaves, keep)]))
    return out


def _aval(x: Any) -> Any:
    return x if isinstance(x, jax.core.ShapedArray) else jax.typeof(x)


def _index(states: Sequence[State], state: State) -> int:
    return next(i for i, s in enumerate(states) if s is state)


def _check_no_states(api: str, what: str, out: Any, recorder: LaneRecorder) -> None:
    returned = [x for x in jax.tree.leaves(out) if isinstance(x, State)]
    for state in (*returned, *recorder.made):
        raise TypeError(
            f"{api}: the {what} creates or returns {describe(state)}; states cannot be "
            f"carried out of a loop, branch or gradient. Create the state outside and write "
            f"its value inside (`state.value = ...`)."
        )


def check_same_structure(api: str, state: State, before: Any, after: Any, fix: str) -> None:
    """Raise if a state's value changes pytree structure."""
    if before != after:
        raise StateTypeError(f"{api}: {describe(state)} enters with structure {before} but leaves with {after}. {fix}")


def check_same_types(api: str, state: State, before: Sequence[Any], after: Sequence[Any], fix: str) -> None:
    """Raise if a state's leaves change shape or dtype (weak types aside)."""
    seen = [(tuple(a.shape), np.dtype(a.dtype) if not _is_key(a) else a.dtype) for a in before]
    now = [(tuple(a.shape), np.dtype(a.dtype) if not _is_key(a) else a.dtype) for a in after]
    if seen != now:
        old = ", ".join(a.str_short() for a in before)
        new = ", ".join(a.str_short() for a in after)
        raise StateTypeError(f"{api}: {describe(state)} enters as {old} but leaves as {new}. {fix}")


def _is_key(aval: Any) -> bool:
    return jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key)
