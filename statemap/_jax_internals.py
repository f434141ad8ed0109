"""The one place statemap touches JAX internals.

Checked against jax/jaxlib 0.10.0 to 0.10.2, the range ``setup.cfg``
declares (``tox -e jax-oldest,jax-newest``). Tracing a lane to a jaxpr needs
things public JAX does not offer: adding an input to a trace that is already
running (a state first read deep inside the function, even inside a nested
``jax.jit``, must become an input of the lane program), tracing collectives
with an axis name bound outside any map, making JAX's trace caches miss once
a state read inside a nested trace is written, and telling which outputs of
a vmap carry its axis in one trace. A warm call also reads, faster than
public JAX lets it, whether any transform runs and the settings a trace
depends on, and relies on which of them ``jax.jit``'s cache keys on.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
from jax._src import api_util, config, core, source_info_util
from jax._src import linear_util as lu
from jax._src.interpreters import batching
from jax._src.interpreters import partial_eval as pe
from jax._src.lax import lax as lax_internal

__all__ = [
    "AxisSizeNeeded",
    "LaneJaxpr",
    "LaneTrace",
    "at_eval_trace",
    "checking_numerics",
    "default_prng_impl",
    "escaped",
    "eval_lane",
    "fast_aval",
    "refused_devices",
    "trace_lane",
    "trace_settings",
    "under_staging_trace",
    "unkeyed_settings",
    "vmap_batched",
    "weakly_typed",
]

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
        """Whether the lane has side effects or calls the host (``jax.pure_callback`` too).

        Either can fail after the program is dispatched.
        """
        return bool(self.jaxpr.effects) or _calls_host(self.jaxpr)

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


class LaneTrace:
    """The running trace of one stateful function, as its catalogue sees it."""

    __slots__ = ("_trace", "_scopes")

    def __init__(self) -> None:
        self._trace: Any = None
        self._scopes: contextlib.ExitStack = contextlib.ExitStack()

    def new_input(self, aval: Aval) -> Any:
        """Append an input of type ``aval`` to the trace and return its tracer.

        It may be called at any depth (inside the user's own ``jax.jit``,
        ``grad`` or ``scan``), where JAX sees it as a closed-over outer tracer.
        """
        return self._trace.new_arg(aval, source_info_util.current())

    def is_current(self) -> bool:
        """Whether code runs at this trace's own level, not inside a nested JAX transform."""
        return core.trace_ctx.trace is self._trace

    def forget_nested_traces(self) -> None:
        """Make JAX's caches miss for nested traces made from now on.

        JAX reuses the trace of a ``jax.jit`` function, ``lax.cond`` branch or
        loop body for the same function, avals and axis environment; a reuse
        would hand back the value a state had when that trace first read it.
        Binding another size-1 axis changes the axis environment until this
        trace ends.
        """
        self._scopes.enter_context(core.extend_axis_env_nd([(f"statemap-trace-{next(_traces)}", 1)]))


def trace_lane(
    fn: Callable[[LaneTrace, Sequence[Any]], Sequence[Any]],
    in_avals: Sequence[Aval],
    axis_name: Hashable | None,
    axis_size: int | None,
) -> LaneJaxpr:
    """Trace ``fn(lane_trace, arg_tracers) -> flat outputs`` to a jaxpr.

    ``lane_trace.new_input(aval)`` appends an input to the running trace.
    Collectives over ``axis_name`` (None: no mapped axis) trace as inside a map
    of ``axis_size``; if that is None and the function needs it (``psum`` of a
    constant, ``axis_size``), ``AxisSizeNeeded`` is raised.
    """
    handle = LaneTrace()

    def lane(*args: Any) -> Sequence[Any]:
        handle._trace = core.trace_ctx.trace
        with handle._scopes:
            return fn(handle, args)

    debug = api_util.debug_info("statemap", fn, (), {})
    wrapped = lu.wrap_init(lane, debug_info=debug)
    # A size-1 axis unique to this trace: the user's own jitted functions that
    # read states close over this trace's inputs, and JAX's jit cache (keyed on
    # the axis environment, not on the trace) must not hand them to a later trace.
    axes: list[tuple[Hashable, Any]] = [(f"statemap-trace-{next(_traces)}", 1)]
    if axis_name is not None:
        axes.insert(0, (axis_name, _UnknownSize() if axis_size is None else axis_size))
    with core.extend_axis_env_nd(axes):
        jaxpr, _, consts = pe.trace_to_jaxpr_dynamic(wrapped, list(in_avals))
    return LaneJaxpr(jaxpr, consts)


def under_staging_trace() -> bool:
    """Whether code runs inside a JAX transform that stages a jaxpr (``jax.jit``, a loop body, ...).

    Concrete values read there become constants of a program JAX may cache.
    """
    trace: Any = core.trace_ctx.trace
    while trace is not None:
        if isinstance(trace, pe.DynamicJaxprTrace):
            return True
        trace = getattr(trace, "parent_trace", None)
    return False


def _calls_host(jaxpr: core.Jaxpr) -> bool:
    return any(
        eqn.primitive.name == "pure_callback" or any(map(_calls_host, core.jaxprs_in_params(eqn.params)))
        for eqn in jaxpr.eqns
    )


def at_eval_trace() -> bool:
    """Whether code runs outside every JAX transform: arrays here are concrete."""
    return type(core.trace_ctx.trace) is core.EvalTrace


def trace_settings() -> tuple[Any, ...]:
    """The JAX settings a trace depends on, as this thread sees them.

    A plan made under one value is wrong under another, so they are part of
    its key: every setting ``jax.jit``'s cache keys on (JAX's own trace
    context, less the axis environment, which the transforms around a call
    supply), and those it does not (see ``unkeyed_settings``).
    """
    context = config.trace_context()
    return (*context[:_AXIS_ENV], *context[_AXIS_ENV + 1 :], *_unkeyed())


# Where JAX's trace context holds the axis environment (an error at import if nowhere).
_AXIS_ENV = next(i for i, value in enumerate(config.trace_context()) if isinstance(value, core.AxisEnv))


def unkeyed_settings() -> tuple[Any, ...] | None:
    """Outside every JAX transform, those of ``trace_settings`` that ``jax.jit`` does not key on; else None.

    A program traced under one default PRNG implementation runs unchanged
    under another, though a key made inside the function changes type; one
    that donates its inputs must not run under ``jax_debug_nans`` or
    ``jax_debug_infs``, whose checks run the function again on the inputs.
    """
    if type(core.trace_ctx.trace) is not core.EvalTrace:
        return None
    return _unkeyed()


def _unkeyed() -> tuple[Any, ...]:
    return (config.default_prng_impl.value, config.debug_nans.value, config.debug_infs.value)


def refused_devices(err: Exception) -> bool:
    """Whether ``jax.jit`` refused a call because its inputs sit on other devices than its program.

    JAX raises a plain ``ValueError`` for it, told apart by its message.
    """
    return isinstance(err, ValueError) and "incompatible devices" in str(err)


def default_prng_impl() -> str:
    """The name of JAX's default PRNG implementation (``jax_default_prng_impl``)."""
    return config.default_prng_impl.value


def checking_numerics() -> bool:
    """Whether ``jax_debug_nans`` or ``jax_debug_infs`` is on: JAX then runs a failing function again."""
    return bool(config.debug_nans.value or config.debug_infs.value)


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


def vmap_batched(
    fn: Callable[..., Sequence[Any]],
    inputs: Sequence[Any],
    in_axes: Sequence[int | None],
    axis_name: Hashable,
    axis_size: int,
) -> list[bool]:
    """Which outputs of ``jax.vmap(fn)`` vary along the mapped axis, by JAX's batching rules.

    One trace under ``jax.eval_shape``: nothing is compiled or run. An output
    is batched when it is a tracer of this vmap carrying its axis; values that
    do not depend on mapped inputs (and ``psum`` results) are not.
    """
    flags: list[bool] = []

    def probe(*xs: Any) -> list[Any]:
        trace = core.trace_ctx.trace
        flags.extend(
            isinstance(x, batching.BatchTracer) and x._trace is trace and x.batch_dim is not None for x in fn(*xs)
        )
        return []

    mapped = jax.vmap(probe, in_axes=tuple(in_axes), out_axes=None, axis_name=axis_name, axis_size=axis_size)
    jax.eval_shape(mapped, *inputs)
    return flags


def weakly_typed(x: Any) -> Any:
    """``x`` with a weak type, as if made from a Python scalar (same dtype and values).

    JAX's transfers between processes drop weak types; a program traced for a
    weakly typed input gets it back with this.
    """
    return lax_internal._convert_element_type(x, weak_type=True)
