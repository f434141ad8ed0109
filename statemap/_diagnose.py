"""Turning JAX's errors from inside a traced function into ones that name the state and the fix.

JAX reports an unbound axis name or a branch on a tracer in its own terms
("call psum under `jax.shard_map`", "Attempted boolean conversion of traced
array"); inside a statemap transform the cause is almost always a missing
``axis_name=`` or a state read in an ``if``, and the fix is statemap's.
"""

from __future__ import annotations

import builtins
import contextlib
import linecache
import os
import re
import threading
import types
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import jax

from ._catalogue import LaneRecorder
from ._state import State, describe
from .errors import AxisNameError, StatemapError, TracedStateError

__all__ = ["baked_error", "diagnosing", "tracer_error"]

_PRIVATE_AXIS = "statemap-"
_UNBOUND = re.compile(r"unbound axis name: (.+?)(?:\. To fix this|$)", re.S)
_STATE_READ = re.compile(r"((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)\.value\b")
_IDENTIFIER = re.compile(r"\b[A-Za-z_]\w*\b")
_SKIPPED_DIRS = (os.path.dirname(jax.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


class _Bound(threading.local):
    names: tuple[Hashable, ...] = ()


_BOUND = _Bound()


def _user_axis_name(name: Hashable | None) -> Hashable | None:
    """``name``, or None for no name or one statemap made up for an unnamed mapping."""
    if isinstance(name, str) and name.startswith(_PRIVATE_AXIS):
        return None
    return name


@contextlib.contextmanager
def diagnosing(api: str, axis_name: Hashable | None, recorder: LaneRecorder) -> Iterator[None]:
    """Trace inside: note that ``axis_name`` is bound, and replace JAX's errors by clearer ones.

    An unbound axis name becomes an ``AxisNameError`` listing the names the
    enclosing mappings bind; a branch on a state's value a ``TracedStateError``
    naming the state. Other errors pass through unchanged.
    """
    saved, name = _BOUND.names, _user_axis_name(axis_name)
    try:
        if name is not None:
            _BOUND.names = (*saved, name)
        yield
    except (NameError, TypeError) as err:
        clearer = _diagnose(api, err, recorder)
        if clearer is None:
            raise
        raise clearer from err
    finally:
        _BOUND.names = saved


def _diagnose(api: str, err: Exception, recorder: LaneRecorder) -> Exception | None:
    """A clearer error for ``err``, or None to keep it."""
    if isinstance(err, StatemapError):
        return None
    if isinstance(err, NameError):
        return _unbound_axis(api, err)
    if isinstance(err, (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError)):
        return _traced_state(api, err, recorder)
    return None


def _unbound_axis(api: str, err: NameError) -> AxisNameError | None:
    found = _UNBOUND.search(str(err))
    if found is None:
        return None
    name = found.group(1).strip()
    bound = _BOUND.names
    if not bound:
        problem = "but no enclosing mapping binds an axis name: `axis_name=` is missing"
        fix = "Name the axis on the mapping whose lanes it should combine"
    else:
        names = ", ".join(repr(n) for n in bound)
        problem = f"which no enclosing mapping binds (bound axis names: {names})"
        fix = "Use a bound name in the collective, or name the axis on the mapping whose lanes it should combine"
    return AxisNameError(
        f"{api}: a collective (`jax.lax.psum`, `pmean`, `axis_index`, ...) uses the axis {name!r}, {problem}. {fix}: "
        f"`statemap.vmap(f, axis_name={name!r})`, `statemap.pmap(f, {name!r})`."
    )


def _traced_state(api: str, err: Exception, recorder: LaneRecorder) -> TracedStateError | None:
    frame, line = _user_frame(err)
    if frame is None:
        return None
    states = _states_on_line(frame, line, recorder)
    if not states:
        return None
    what = "`int()`/`range()`/indexing" if isinstance(err, jax.errors.TracerIntegerConversionError) else "`if`/`while`/`bool()`"
    where = f"{frame.f_code.co_filename}:{line} (`{linecache.getline(frame.f_code.co_filename, line).strip()}`)"
    return TracedStateError(
        f"{api}: Python control flow ({what}) on the value of {', '.join(map(describe, states))}, "
        f"at {where}. A state's value is an input of the compiled program, so while {api} traces "
        f"the function it is a tracer and Python cannot branch on it. Select with "
        f"`jnp.where(cond, a, b)`, branch with `statemap.cond(pred, true_fn, false_fn)`, or, for a "
        f"flag fixed for the whole call (`training=True`), pass it as a static Python value "
        f"(`static_argnames=` of statemap.jit and statemap.vmap, `static_broadcasted_argnums=` "
        f"of statemap.pmap) instead of keeping it in a state."
    )


def _user_frame(err: BaseException) -> tuple[types.FrameType | None, int]:
    """The innermost frame of ``err``'s traceback outside JAX and statemap, and its line."""
    found: tuple[types.FrameType | None, int] = (None, 0)
    tb = err.__traceback__
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(_SKIPPED_DIRS):
            found = (tb.tb_frame, tb.tb_lineno)
        tb = tb.tb_next
    return found


def _states_on_line(frame: types.FrameType, line: int, recorder: LaneRecorder) -> list[State]:
    """The states the traced function touched whose values the source line uses."""
    source = linecache.getline(frame.f_code.co_filename, line)
    found: dict[int, State] = {}
    for chain in _STATE_READ.findall(source):
        state = _resolve(frame, chain)
        if isinstance(state, State):
            found.setdefault(id(state), state)
    # A state's value read into a local on an earlier line: ``v = s.value`` then ``if v:``.
    for name in set(_IDENTIFIER.findall(source)):
        value = frame.f_locals.get(name)
        if isinstance(value, jax.core.Tracer):
            for state, lane_value in recorder.lane_values.items():
                if any(leaf is value for leaf in jax.tree.leaves(lane_value)):
                    found.setdefault(id(state), state)
    return [s for s in found.values() if s in recorder.inputs or s in recorder.made]


def _resolve(frame: types.FrameType, chain: str) -> Any:
    """The object a dotted name ``a.b.c`` names in ``frame``, or None."""
    head, *rest = chain.split(".")
    scopes = (frame.f_locals, frame.f_globals, vars(builtins))
    obj = next((scope[head] for scope in scopes if head in scope), None)
    for attr in rest:
        if obj is None:
            return None
        try:
            obj = getattr(obj, attr)
        except Exception:  # noqa: BLE001 (a property that fails names no state)
            return None
    return obj


def baked_error(api: str, state: State) -> StatemapError:
    """The error for a transform that would bake ``state``'s value into a raw JAX program."""
    return StatemapError(
        f"{api}: called inside a JAX transformation that statemap does not manage and "
        f"that stages a program (jax.jit, a jax.lax loop or branch, jax.checkpoint, ...): "
        f"the current value of {describe(state)} would be baked into that program as a "
        f"constant, and later calls would not see its new values. Use statemap.jit (and "
        f"statemap.scan, statemap.for_loop, statemap.cond, ...) instead."
    )


def tracer_error(api: str, states: Sequence[State]) -> StatemapError:
    """The error for writes that would leave a raw JAX transform's tracers in ``states``."""
    which = ", ".join(describe(s) for s in states) or "the states it creates"
    return StatemapError(
        f"{api}: called inside a JAX transformation that statemap does not manage "
        f"(jax.vmap, jax.grad, jax.jvp, ...), so the states it writes ({which}) would be "
        f"left holding that transformation's tracers. Call it outside, or use statemap's "
        f"own transforms (statemap.vmap, statemap.grad, statemap.jit, ...) around it."
    )
