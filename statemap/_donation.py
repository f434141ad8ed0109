"""Donating the old buffers of written states, so device memory does not double.

A written state's old value is an input of the call's program, and its new
value an output of the same shape: donating the input lets XLA write the
output in place. JAX users expect arrays to be immutable, though, so a buffer
is donated only when statemap holds the only references to it; a value
someone else holds (``old = state.value``, a second state, an argument)
enters as a fresh copy instead, and the program compiled with donation is
the same for both.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import jax

from ._jax_internals import checking_numerics
from ._plan import Exit

if TYPE_CHECKING:
    from ._call import Call
    from ._catalogue import LaneRecorder
    from ._jax_internals import LaneJaxpr
    from ._planner import Decisions, LaneOutputs

__all__ = ["donatable", "shield", "spent"]


def donatable(
    call: Call, lane: LaneJaxpr, recorder: LaneRecorder, outputs: LaneOutputs, decisions: Decisions, size: int
) -> tuple[int, ...]:
    """Flat input positions of the written states whose old buffer the new value can reuse.

    Only single-array states are donated (a pytree value can be held whole while
    its leaves' counts stay low), and only when the output has the input's
    shape and dtype (a stacked output gains ``size`` at its axis), so XLA can
    always use the buffer; keys (extended dtypes) are small and left alone.
    Nothing is donated by a program with effects or host callbacks (they can
    fail after dispatch, and a failed call must keep the old values), nor
    under ``jax_debug_nans``/``jax_debug_infs`` (a NaN runs the function
    again on its inputs), nor by one planned inside a JAX transform (plans
    are keyed by that, see ``Call``): there the old buffers may be the
    transform's own inputs (``jax.grad`` keeps its primal values), and a
    batched output would leave the donation unusable and JAX warn about it.
    """
    if lane.has_effects or not call.outside or checking_numerics():
        return ()
    position, pos = {}, len(call.leaves)
    for state in recorder.inputs:
        entry = recorder.inputs[state]
        if entry.is_leaf:
            position[id(state)] = (pos, jax.typeof(recorder.before[state]))
        pos += len(entry.leaf_axes)
    donated, pos = [], outputs.num_user_leaves
    for out in decisions.outs:
        found = position.get(id(out.ref()))
        if found is not None and out.is_leaf and out.exit in (Exit.AS_IS, Exit.STACKED):
            new = lane.out_avals[pos]
            shape = list(new.shape)
            if out.exit is Exit.STACKED:
                shape.insert(cast(int, out.axis) % (len(shape) + 1), size)
            same = tuple(shape) == tuple(found[1].shape) and new.dtype == found[1].dtype
            if same and not jax.dtypes.issubdtype(new.dtype, jax.dtypes.extended):  # keys: not worth the risk
                donated.append(found[0])
        pos += out.num_leaves
    return tuple(sorted(donated))


class _Slot:
    __slots__ = ("_value",)
    _value: Any


def _baseline() -> int:
    """References to a state's value that statemap itself holds when ``shield`` looks.

    The state's slot, the run's ``values`` and ``inputs`` lists, and
    ``getrefcount``'s argument: measured here, with the expression ``shield``
    uses, so it holds on any CPython version.
    """
    value, slot = object(), _Slot()
    slot._value = value
    values, inputs = [value], [value]
    del value
    count = sys.getrefcount(inputs[0])
    del slot, values
    return count


_HELD = _baseline()


def shield(inputs: list[Any], positions: Sequence[int], copy_all: bool) -> None:
    """Put fresh copies in ``inputs`` at ``positions`` for every buffer that must survive the call.

    The caller's ``inputs`` and ``values`` lists must be statemap's only
    references besides the state's own slot (see ``_baseline``). Every
    concrete value is copied (``copy_all``) when the call is watched (a
    ``StateTrace`` or an enclosing statemap trace sees its writes, not the
    states) or inside an outer JAX transform (``jax.vmap`` may run the
    program eagerly, and the call then fails after it).
    """
    for pos in positions:
        if copy_all or sys.getrefcount(inputs[pos]) > _HELD:
            value = inputs[pos]
            if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
                inputs[pos] = _fresh(value)


def _fresh(value: jax.Array) -> jax.Array:
    """A copy of ``value`` that the program may consume.

    Both copies keep the sharding and whether the value is committed to it, so
    the copy hits the same compiled program. The first copy of a kind of value
    is made by ``device_put``, which compiles nothing; from the second on, by
    a compiled copy, a few microseconds where ``device_put`` takes tens, which
    counts when a loop keeps every step's state (``trace.append(h.value)``).
    A value spread over several processes is always copied by ``device_put``,
    which needs no other process to take part.
    """
    if value.is_fully_addressable:
        kind = (value.shape, value.dtype, value.weak_type, value.sharding)
        if kind in _COPIED:
            return _copy(value)
        _COPIED.add(kind)
    return jax.device_put(value, may_alias=False)


_COPIED: set[tuple[Any, ...]] = set()  # the kinds of values copied once already


@jax.jit
def _copy(value: jax.Array) -> jax.Array:
    return value.copy()


def spent(values: Sequence[Any]) -> bool:
    """Whether any of the input states' ``values`` was donated (its buffer is gone)."""
    return any(isinstance(v, jax.Array) and not isinstance(v, jax.core.Tracer) and v.is_deleted() for v in values)
