"""Turning one traced lane into a plan: inputs, outputs, batched-ness, policy."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import attrs
import jax
import numpy as np

from ._axes import StateAxes, axis_in_range
from ._catalogue import Entry, LaneRecorder, StateIn
from ._jax_internals import LaneJaxpr, escaped, eval_lane
from ._plan import TRUSTED, Exit, StalePlan, StateOut, batched_outputs
from ._policy import WritePolicy
from ._state import State, describe
from .errors import BatchAxisError, StatemapError

__all__ = ["Decisions", "LaneOutputs", "collect_outputs", "decide_outputs", "make_lane_fn"]


@attrs.define
class LaneOutputs:
    """What the traced function returned and wrote, in the lane jaxpr's output order."""

    out_tree: Any = None
    out_slots: list[Any] = attrs.field(factory=list)
    num_user_leaves: int = 0
    written: list[tuple[State, Any, int]] = attrs.field(factory=list)
    made: list[tuple[State, Any, int]] = attrs.field(factory=list)


@attrs.frozen
class Decisions:
    """Per-output axes for the mapped program, and how each state leaves."""

    out_axes: list[int | None]
    outs: tuple[StateOut, ...]
    made: tuple[StateOut, ...]
    advanced: tuple[StateOut, ...]
    refusal: str | None
    warnings: tuple[str, ...]


def make_lane_fn(
    lane: LaneJaxpr,
    num_args: int,
    ins: Sequence[StateIn],
    lane_key: Callable[[Any, Any], Any],
) -> Callable[..., list[Any]]:
    """The per-lane program: derive lane keys, evaluate the lane, return outputs and advanced keys.

    Its inputs are the ``num_args`` argument leaves, then the leaves of ``ins``.
    """
    key_positions, pos = [], num_args
    for entry in ins:
        if entry.entry is Entry.LANE_KEY:
            key_positions.append(pos)
        pos += len(entry.leaf_axes)
    expected = [(aval.shape, aval.dtype, aval.weak_type) for aval in lane.in_avals]

    def lane_fn(lane_index: Any, *inputs: Any) -> list[Any]:
        if TRUSTED.active or not _fits(inputs, expected):
            raise StalePlan()
        values = list(inputs)
        advanced = []
        for pos in key_positions:
            new_parent, base = jax.random.split(values[pos])
            advanced.append(new_parent)
            values[pos] = lane_key(base, lane_index)
        return [*eval_lane(lane, values), *advanced]

    return lane_fn


def _fits(inputs: Sequence[Any], expected: Sequence[tuple[Any, Any, bool]]) -> bool:
    """Whether a retrace's lane inputs have the shapes, dtypes and weak types the plan was traced for."""
    if len(inputs) != len(expected) or not all(isinstance(x, jax.Array) for x in inputs):
        return False
    avals = map(jax.typeof, inputs)
    return all((a.shape, a.dtype, a.weak_type) == want for a, want in zip(avals, expected))


def _stack_axes(api: str, state: State, axis: int, avals: Sequence[Any]) -> list[int]:
    fixed = []
    for aval in avals:
        ndim = len(aval.shape) + 1
        good = axis_in_range(axis, ndim)
        if good is None:
            raise BatchAxisError(
                f"{api}: `state_out_axes` stacks {describe(state)} on axis {axis}, which is "
                f"out of range for a stacked value of rank {ndim}. Use an axis in "
                f"[{-ndim}, {ndim})."
            )
        fixed.append(good)
    return fixed


def decide_outputs(
    api: str,
    lane: LaneJaxpr,
    recorder: LaneRecorder,
    outputs: LaneOutputs,
    user_axes: list[int | None],
    state_out_axes: StateAxes,
    policy: WritePolicy,
    find_batched: Callable[[Sequence[int]], set[int]],
) -> Decisions:
    """Place every output: user outputs on ``user_axes``, states by the rules of one call."""
    out_axes: list[int | None] = list(user_axes)
    plans = _place_written(api, lane.out_avals, recorder, outputs, state_out_axes, out_axes)
    created = _place_made(api, lane.out_avals, outputs, state_out_axes, out_axes)
    batched = find_batched([i for i, a in enumerate(out_axes) if a is None])
    _check_user_outputs(api, batched, len(user_axes))
    refused: list[tuple[State, str]] = []
    warned: list[str] = []
    outs, pos = _leave(api, plans, len(user_axes), batched, policy, out_axes, refused, warned)
    made, _ = _leave(api, created, pos, batched, policy, out_axes, refused, warned)
    advanced = []
    for state, entry in recorder.inputs.items():
        if entry.entry is Entry.LANE_KEY:
            advanced.append(StateOut(weakref.ref(state), Exit.ADVANCED, None, entry.treedef, 1))
            out_axes.append(None)
    refusal = _refusal(api, refused)
    return Decisions(out_axes, tuple(outs), tuple(made), tuple(advanced), refusal, tuple(warned))


_Placing = tuple[State, Any, int, str, "int | None"]


def _leave(
    api: str,
    plans: Sequence[_Placing],
    pos: int,
    batched: set[int],
    policy: WritePolicy,
    out_axes: list[int | None],
    refused: list[tuple[State, str]],
    warned: list[str],
) -> tuple[list[StateOut], int]:
    """How each of ``plans`` (from output position ``pos``) leaves, now that ``batched`` is known; and the next position."""
    outs = []
    for state, treedef, n, kind, where in plans:
        varies = any(i in batched for i in range(pos, pos + n))
        exit, axis = _exit(kind, where, varies, policy)
        if exit is Exit.STACKED and kind != "stacked":
            out_axes[pos : pos + n] = [0] * n
            if policy is WritePolicy.WARN:
                warned.append(_warning(api, state))
        if exit is Exit.REFUSED:
            refused.append((state, kind))
        outs.append(StateOut(weakref.ref(state), exit, axis, treedef, n))
        pos += n
    return outs, pos


def _place_made(
    api: str, avals: Sequence[Any], outputs: LaneOutputs, state_out_axes: StateAxes, out_axes: list[int | None]
) -> list[_Placing]:
    """How each state created inside is meant to leave: stacked on axis 0, unless ``state_out_axes`` selects it."""
    plans: list[_Placing] = []
    pos = len(out_axes)
    for state, treedef, n in outputs.made:
        selected, axis = state_out_axes.match(state)
        where = axis if selected else 0
        plans.append((state, treedef, n, "stacked" if where is not None else "declared", where))
        out_axes += [None] * n if where is None else _stack_axes(api, state, where, avals[pos : pos + n])
        pos += n
    return plans


def _place_written(
    api: str,
    avals: Sequence[Any],
    recorder: LaneRecorder,
    outputs: LaneOutputs,
    state_out_axes: StateAxes,
    out_axes: list[int | None],
) -> list[_Placing]:
    """How each written state is meant to leave; appends its leaves' axes to ``out_axes``.

    ``kind`` is ``'stacked'`` (on ``where``), ``'declared'`` (``state_out_axes``
    says None: must not vary) or ``'policy'`` (must not vary, or the policy decides).
    """
    plans = []
    pos = len(out_axes)
    for state, treedef, n in outputs.written:
        entry = recorder.inputs[state]
        selected, axis = state_out_axes.match(state)
        if selected and axis is not None:
            kind, where = "stacked", axis
        elif selected:
            kind, where = "declared", None
        elif entry.entry is Entry.SPLIT:
            kind, where = "stacked", entry.axis
        else:
            kind, where = "policy", None
        plans.append((state, treedef, n, kind, where))
        stacked = kind == "stacked" and where is not None
        out_axes += _stack_axes(api, state, where, avals[pos : pos + n]) if stacked else [None] * n  # type: ignore[arg-type]
        pos += n
    return plans


def _exit(kind: str, where: int | None, varies: bool, policy: WritePolicy) -> tuple[Exit, int | None]:
    if kind == "stacked":
        return Exit.STACKED, where
    if not varies:
        return Exit.AS_IS, None
    if kind == "declared" or policy is WritePolicy.RAISE:
        return Exit.REFUSED, None
    return Exit.STACKED, 0


def _check_user_outputs(api: str, batched: set[int], num_user: int) -> None:
    bad = sorted(i for i in batched if i < num_user)
    if bad:
        raise ValueError(
            f"{api}: output leaf {bad[0]} varies across the mapped axis, but `out_axes` "
            f"is None for it. Give it an axis (`out_axes=0`), or return a value that is "
            f"the same on every lane (for example reduced with `jax.lax.psum`)."
        )


def _warning(api: str, state: State) -> str:
    return (
        f"{api}: {describe(state)} was written with a value that varies across the "
        f"mapped axis; it is stacked along axis 0 because "
        f"`unexpected_out_state_mapping='warn'`. Select it in `state_out_axes` to "
        f"choose the axis and silence this warning."
    )


def _refusal(api: str, refused: list[tuple[State, str]]) -> str | None:
    if not refused:
        return None
    lines = []
    for state, kind in refused:
        why = (
            "`state_out_axes` maps it to None (must not vary)"
            if kind == "declared"
            else "no `state_in_axes`/`state_out_axes` entry places it on an axis"
        )
        lines.append(f"  * {describe(state)}: {why}")
    bullets = "\n".join(lines)
    fixes = "Stack them with `state_out_axes={0: <filter>}`"
    if any(kind == "policy" for _, kind in refused):
        fixes += (
            ", split them on entry with `state_in_axes={0: <filter>}`, or pass "
            "`unexpected_out_state_mapping='warn'` to stack them along axis 0. If every lane "
            "should hold the same value (a running statistic such as a batch mean), average it "
            "over the lanes first: `jax.lax.pmean(value, axis_name)`, with the mapping's `axis_name=`"
        )
    else:
        fixes += ", or write a value that is the same on every lane (e.g. reduced with `jax.lax.psum`)"
    return (
        f"{api}: these states are written with values that vary across the mapped "
        f"axis (one value per lane), so they cannot be written back as a single value:\n"
        f"{bullets}\n{fixes}."
    )


def probe_batched(
    lane_fn: Callable[..., Sequence[Any]],
    inputs: Sequence[Any],
    in_axes: tuple[int | None, ...],
    axis_name: Hashable,
    axis_size: int,
) -> Callable[[Sequence[int]], set[int]]:
    """``find_batched`` for ``decide_outputs``, deciding with JAX's vmap rules.

    The probe runs on shapes with ``axis_size`` on every mapped axis: under
    ``jax.distributed`` a process passes only its part of the lanes.
    """
    inputs = [_with_axis_size(x, axis, axis_size) for x, axis in zip(inputs, in_axes)]
    return lambda candidates: batched_outputs(lane_fn, inputs, in_axes, candidates, axis_name, axis_size)


def _with_axis_size(x: Any, axis: int | None, size: int) -> Any:
    if axis is None or np.shape(x)[axis] == size:
        return x
    aval = jax.typeof(x)
    shape = (*aval.shape[:axis], size, *aval.shape[axis + 1 :])
    return jax.ShapeDtypeStruct(shape, aval.dtype, weak_type=aval.weak_type)


def state_in_axes_per_leaf(ins: Sequence[StateIn]) -> list[int | None]:
    """The map's input axis for every leaf of every input state (keys enter unbatched)."""
    return [axis if entry.entry is Entry.SPLIT else None for entry in ins for axis in entry.leaf_axes]


def normalise_out_axes(api: str, axes: list[int | None], avals: Sequence[Any]) -> list[int | None]:
    """Non-negative user ``out_axes``, checked against each output's rank plus one."""
    fixed: list[int | None] = []
    for axis, aval in zip(axes, avals):
        if axis is None:
            fixed.append(None)
            continue
        ndim = len(aval.shape) + 1
        good = axis_in_range(axis, ndim)
        if good is None:
            raise ValueError(
                f"{api}: `out_axes` {axis} is out of range for an output of lane shape "
                f"{tuple(aval.shape)}; use an axis in [{-ndim}, {ndim})."
            )
        fixed.append(good)
    return fixed


def collect_outputs(api: str, out: Any, recorder: LaneRecorder, outputs: LaneOutputs) -> list[Any]:
    """Flatten what the lane returned and wrote into the lane jaxpr's outputs."""
    leaves, outputs.out_tree = jax.tree.flatten(out)
    # What ``jax.vmap`` takes as an output: NumPy values are broadcast like constants.
    array_like = (jax.Array, np.ndarray, np.generic, int, float, complex, bool)
    arrays = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, State):
            outputs.out_slots.append(leaf)
        elif isinstance(leaf, array_like) or hasattr(leaf, "__jax_array__"):
            outputs.out_slots.append(None)
            arrays.append(leaf)
        else:
            raise TypeError(
                f"{api}: the function returned a {type(leaf).__name__} ({leaf!r}) as output "
                f"leaf {i}; a mapped function may return arrays and States (in any pytree)."
            )
    outputs.num_user_leaves = len(arrays)
    flat = list(arrays)
    for state in recorder.written:
        if recorder.inputs[state].entry is not Entry.LANE_KEY:
            leaves, treedef = jax.tree.flatten(recorder.lane_values[state])
            if any(map(escaped, leaves)):
                raise StatemapError(
                    f"{api}: {describe(state)} was written inside a JAX transformation within the "
                    f"function (jax.jit, jax.lax.scan, jax.vmap, ...), whose values cannot leave "
                    f"it. Return the value from that inner function and write the state outside it."
                )
            outputs.written.append((state, treedef, len(leaves)))
            flat += leaves
    for state in recorder.made:
        leaves, treedef = jax.tree.flatten(state._value)
        outputs.made.append((state, treedef, len(leaves)))
        flat += leaves
    return flat
