"""The one place statemap touches JAX internals.

Checked against jax/jaxlib 0.10.2. Tracing a lane to a jaxpr needs two
things public JAX does not offer: adding an input to a trace that is already
running (a state first read deep inside the function, even inside a nested
``jax.jit``, must become an input of the lane program), and tracing collectives
with an axis name bound outside any map.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
from jax._src import api_util, core, source_info_util
from jax._src import linear_util as lu
from jax._src.interpreters import partial_eval as pe

__all__ = ["AxisSizeNeeded", "LaneJaxpr", "escaped", "eval_lane", "fast_aval", "trace_lane"]

Aval = Any

_traces = itertools.count()


class LaneJaxpr:
    """A traced lane: a closed jaxpr whose inputs are the arguments, then late inputs."""

    __slots__ = ("jaxpr", "consts")

    def __init__(self, jaxpr: Any, consts: Sequence[Any]):
        self.jaxpr = jaxpr
        self.consts = list(consts)

    @property
    def in_avals(self) -> list[Any]:
        return [v.aval for v in self.jaxpr.invars]

    @property
    def has_effects(self) -> bool:
        """Whether the lane has side effects, such as host callbacks."""
        return bool(self.jaxpr.effects)

    @property
    def out_avals(self) -> list[Any]:
        return [v.aval for v in self.jaxpr.outvars]

    def __str__(self) -> str:
        return str(self.jaxpr)


class AxisSizeNeeded(Exception):
    """The traced function used the axis size before anything gave it."""


class _UnknownSize:
    """Stands in for an axis size not known yet; using it raises ``AxisSizeNeeded``."""

    def _needed(self, *args: Any) -> Any:
        raise AxisSizeNeeded()

    __index__ = __int__ = __float__ = _needed
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _needed
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = _needed
    __lt__ = __le__ = __gt__ = __ge__ = _needed

    def __repr__(self) -> str:
        return "<axis size not known yet>"


def trace_lane(
    fn: Callable[[Callable[[Aval], Any], Sequence[Any]], Sequence[Any]],
    in_avals: Sequence[Aval],
    axis_name: Hashable,
    axis_size: int | None,
) -> LaneJaxpr:
    """Trace ``fn(new_input, arg_tracers) -> flat outputs`` to a jaxpr.

    ``new_input(aval)`` appends an input to the running trace and returns its
    tracer; it may be called at any depth (inside the user's own ``jax.jit``,
    ``grad`` or ``scan``), where JAX sees it as a closed-over outer tracer.
    Collectives over ``axis_name`` trace as inside a map of ``axis_size``;
    if that is None and the function needs it (``psum`` of a constant,
    ``axis_size``), ``AxisSizeNeeded`` is raised.
    """
    outer: list[Any] = []

    def new_input(aval: Aval) -> Any:
        return outer[0].new_arg(aval, source_info_util.current())

    def lane(*args: Any) -> Sequence[Any]:
        outer.append(core.trace_ctx.trace)
        return fn(new_input, args)

    debug = api_util.debug_info("statemap", fn, (), {})
    wrapped = lu.wrap_init(lane, debug_info=debug)
    # A size-1 axis unique to this trace: the user's own jitted functions that
    # read states close over this trace's inputs, and JAX's jit cache (keyed on
    # the axis environment, not on the trace) must not hand them to a later trace.
    this_trace = f"statemap-trace-{next(_traces)}"
    size = _UnknownSize() if axis_size is None else axis_size
    with core.extend_axis_env_nd([(axis_name, size), (this_trace, 1)]):  # type: ignore[list-item]
        jaxpr, _, consts = pe.trace_to_jaxpr_dynamic(wrapped, list(in_avals))
    return LaneJaxpr(jaxpr, consts)


def eval_lane(lane: LaneJaxpr, inputs: Sequence[Any]) -> list[Any]:
    """Evaluate a traced lane on ``inputs`` (under whatever transform is active)."""
    return core.eval_jaxpr(lane.jaxpr, lane.consts, *inputs)


def escaped(x: Any) -> bool:
    """Whether ``x`` is a tracer of a transformation that is neither running nor enclosing.

    Called while a lane is traced: a value written to a state inside the
    user's own ``jax.jit``, ``scan`` or ``vmap`` is such a tracer.
    """
    if not isinstance(x, core.Tracer):
        return False
    trace: Any = core.trace_ctx.trace
    while trace is not None:
        if x._trace is trace:
            return False
        trace = getattr(trace, "parent_trace", None)
    return True


def fast_aval(x: Any) -> Any:
    """The abstract value of ``x``; ``.aval`` is undocumented but 30x faster than ``jax.typeof``."""
    aval = getattr(x, "aval", None)
    return jax.typeof(x) if aval is None else aval
