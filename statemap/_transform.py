"""StatefulTransform: the engine every statemap transform shares."""

from __future__ import annotations

import abc
import functools
import types
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any, cast

import jax

from ._cache import PlanCache, shared_plans
from ._call import Call, infer_static
from ._catalogue import Decide, LaneRecorder, SizeSources, pass_through
from ._diagnose import baked_error, diagnosing
from ._dispatch import RUN_LOCK, dispatch
from ._explain import Explanation
from ._identity import IdentityDict
from ._jax_internals import LaneJaxpr, LaneTrace, at_eval_trace, trace_lane, under_staging_trace
from ._plan import TRUSTED, Plan, StalePlan, shapes_of
from ._planner import Decisions, LaneOutputs, collect_outputs
from ._shortcut import MISS, Shortcut
from ._state import State, current_watcher, drop_watcher, pop_watcher, push_watcher, read_through
from ._warn import warn
from ._writeback import detached
from .errors import BatchAxisError

__all__ = ["MISSING", "StatefulTransform", "validate_only"]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
"""The default of ``fn`` in ``vmap``/``pmap``/``jit``: without a function they return a decorator."""


def validate_only(*args: Any, **kwargs: Any) -> None:
    """Stands in for the function when a decorator form (``fn`` MISSING) checks its arguments before decorating."""


_COLD: Any = object()  # what ``_warm`` returns when no cached plan can run the call
_REBUILDS = 2  # retraces of a call whose new plan went stale before its first run


class StatefulTransform(abc.ABC):
    """A JAX transform over a function that reads and writes ``State`` objects.

    The base traces the function once per call signature, cataloguing the
    states it touches (each becomes an input of the traced program when first
    touched), caches the plan, runs it on the states' current values and
    writes the results back all-or-nothing. Subclasses say how states enter
    (``_entries``) and turn a traced function into a plan (``_build``).
    ``StatefulMapping`` and ``JitTransform`` are its subclasses.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> step = statemap.jit(lambda x: x + 1)
      >>> isinstance(step, statemap.StatefulTransform), step(jnp.ones(2))
      (True, Array([2., 2.], dtype=float32))
    """

    api: str = "statemap.StatefulTransform"
    static_argnums_name: str = "static_argnums"
    has_lanes: bool = False
    plan_capacity: int = 4096
    """Call signatures whose plans a transform keeps (least recently used out, with a warning)."""
    in_axes: Any = None
    axis_size: int | None = None
    compile_ahead: bool = False
    """Whether plans' programs are ``jax.jit`` functions, compiled before the first run (see ``_compile``)."""
    programs_check_inputs: bool = False
    """Whether plans' programs refuse inputs of other shapes than they were planned for.

    Such a program (a ``jax.jit`` of a ``jax.vmap`` with its axis size fixed,
    say) runs only for the input signatures it was traced for, and for any
    other traces again and fails (its lanes see other shapes, or the mapped
    axes disagree with its fixed size). If not,
    every call compares the states' values with the plan; if so, that check
    is left to the program, and repeated calls leave it the arguments too.
    A subclass that builds its own programs (defines ``_map`` or ``_build``)
    vouches for them itself: unless it sets this beside them, it is False.
    """

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if "programs_check_inputs" not in vars(cls) and not vars(cls).keys().isdisjoint(("_map", "_build")):
            cls.programs_check_inputs = False

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        static_argnums: int | Sequence[int] = (),
        static_argnames: str | Sequence[str] = (),
        donate_argnums: int | Sequence[int] = (),
    ):
        if not callable(fn):
            raise TypeError(f"{self.api}: `fn` must be callable, got {type(fn).__name__}: {fn!r}.")
        static_argnums, static_argnames = infer_static(
            self.api, fn, static_argnums, static_argnames, self.static_argnums_name
        )
        self.fn = fn
        self.static_argnums = _argnums(self.api, self.static_argnums_name, static_argnums)
        self.static_argnames = _argnames(self.api, static_argnames)
        self.donate_argnums = _argnums(self.api, "donate_argnums", donate_argnums)
        self.__wrapped__ = fn
        self.__name__ = getattr(fn.func if isinstance(fn, functools.partial) else fn, "__name__", type(fn).__name__)
        self.__doc__ = getattr(fn, "__doc__", None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__name__})"

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        # A decorated method binds its instance, as a ``jax.jit`` one does;
        # mark it static (``static_argnums=0``) unless it is a pytree of arrays.
        return self if instance is None else types.MethodType(self, instance)

    @functools.cached_property
    def _plans(self) -> PlanCache:
        """The plans of every transform of ``fn`` of this type with these options."""
        owner = f"{self.api} of {self.__name__!r}"
        make = functools.partial(PlanCache, self.plan_capacity, owner=owner)
        return shared_plans(self.fn, (type(self), self.plan_capacity, self._options()), make)

    def _options(self) -> Hashable:
        """Everything besides ``fn`` that shapes a plan; subclasses extend it."""
        return (self.static_argnums, self.static_argnames, self.donate_argnums)

    # Hooks for subclasses.

    @abc.abstractmethod
    def _build(self, call: Call) -> tuple[Plan, list[State]]:
        """Trace the function for ``call`` (with ``_trace``) and return its plan and the states it created."""

    def _entries(self, call: Call) -> Decide:
        """How each state enters the traced function; as it is, by default."""
        return pass_through

    def _explain_lines(self, plan: Plan) -> list[str]:
        """Extra lines for ``explain()`` (devices, for instance); none by default."""
        return []

    # The call.

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        shortcut = self._plans.shortcut
        if shortcut is not None and not kwargs:
            out = shortcut.run(args)
            if out is not MISS:
                return out
        call = Call(self, args, kwargs)
        for _ in range(_REBUILDS):
            out = self._attempt(call, retry=True)
            if out is not _COLD:
                return out
        return self._attempt(call, retry=False)

    def _attempt(self, call: Call, retry: bool) -> Any:
        """Run ``call`` with a cached plan, or build one; ``_COLD`` if it went stale and ``retry``."""
        with RUN_LOCK:
            out = self._warm(call)
        return self._cold(call, retry) if out is _COLD else out

    def _warm(self, call: Call) -> Any:
        """Run ``call`` with a cached plan (the caller holds ``RUN_LOCK``); ``_COLD`` if none fits."""
        for rank, plan in enumerate(self._plans.get(call.key)):
            try:
                out = self._run(plan, call, None)
            except StalePlan:
                if plan.states() is None:
                    self._plans.discard(call.key, plan)
                continue
            if rank:
                self._plans.promote(call.key, plan)
            if self._plans.shortcut is None or self._plans.shortcut.plan is not plan:
                self._plans.shortcut = Shortcut.of(self, call, plan, self._plans)
            return out
        return _COLD

    def _cold(self, call: Call, retry: bool) -> Any:
        """Trace and compile a plan for ``call`` and run it; ``_COLD`` if it went stale meanwhile and ``retry``.

        Tracing and compiling hold only this plan cache's build lock (as ``jax.jit``
        compiles while other calls run); a thread wanting the same plan waits for it.
        """
        TRUSTED.active = False  # in case an interrupt left it set: a cold call never repeats one
        with self._plans.building:
            with RUN_LOCK:
                out = self._warm(call)  # built by another thread while this one waited
            if out is not _COLD:
                return out
            plan, made = self._build(call)
            if self.compile_ahead and plan.refusal is None:  # a refused plan never runs
                self._compile(plan, call)
            with RUN_LOCK:
                self._plans.add(call.key, plan)
        with RUN_LOCK:
            try:
                return self._run(plan, call, made)
            except StalePlan:
                # Another thread changed a state's shape between the trace and this run.
                if retry:
                    return _COLD
                raise

    def explain(self, *args: Any, **kwargs: Any) -> Explanation:
        """Show the plan for a call with these arguments without running it.

        The function is traced (once per signature, as by a call) but the
        program does not run and no state changes; a later call with the same
        signature reuses the plan.

        Example:
          >>> import jax.numpy as jnp
          >>> import statemap
          >>> h = statemap.HiddenState(jnp.zeros((4, 2)), name='h')
          >>> step = statemap.vmap(lambda x: h.value + x, state_in_axes=statemap.HiddenState)
          >>> print(step.explain(jnp.ones((4, 2))))  # doctest: +NORMALIZE_WHITESPACE +ELLIPSIS
          statemap.vmap plan for <lambda>: 4 lanes (axis size from argument args[0], axis 0)
          state                   enters           leaves     object
          HiddenState 'h' (4, 2)  split on axis 0  unchanged  0x...
        """
        call = Call(self, args, kwargs)
        with self._plans.building:
            with RUN_LOCK:
                plan = next((p for p in self._plans.get(call.key) if self._fits(p)), None)
            if plan is None:
                plan, _ = self._build(call)
                with RUN_LOCK:
                    self._plans.add(call.key, plan)
        return Explanation(self.api, self.__name__, plan, self._explain_lines(plan), self.has_lanes)

    def clear_cache(self) -> None:
        """Forget the plans of this function and these options, as ``jax.jit(f).clear_cache()`` does.

        Plans are shared by every transform built from the same function object
        with the same options, so building the transform again keeps them. The
        next call traces the function again and finds the State objects it
        reaches now: needed after *replacing* a state object the function
        reads, while the old one is still alive.

        Example:
          >>> import jax.numpy as jnp
          >>> import statemap
          >>> params = {'w': statemap.ParamState(jnp.ones(2))}
          >>> apply = statemap.vmap(lambda x: x * params['w'].value)
          >>> _ = apply(jnp.ones((3, 2)))
          >>> old, params['w'] = params['w'], statemap.ParamState(jnp.full(2, 5.0))
          >>> apply.clear_cache()
          >>> apply(jnp.ones((1, 2)))
          Array([[5., 5.]], dtype=float32)
        """
        self._plans.clear()

    def _trace(
        self, call: Call, sizes: SizeSources, axis_name: Hashable | None, hint: int | None
    ) -> tuple[Any, LaneRecorder, LaneOutputs]:
        """Trace the function once: its jaxpr, the catalogue of its states, and its outputs."""
        recorder = LaneRecorder(self.api, self._entries(call), sizes, current_watcher())
        outputs = LaneOutputs()
        try:
            with diagnosing(self.api, axis_name, recorder):
                lane = trace_lane(self._lane_body(call, recorder, outputs), call.lane_avals, axis_name, hint)
        finally:
            drop_watcher(recorder)  # in case an interrupt landed between push and try
            for state in recorder.made:
                state._value = None
        return lane, recorder, outputs

    def _lane_body(
        self, call: Call, recorder: LaneRecorder, outputs: LaneOutputs
    ) -> Callable[[LaneTrace, Sequence[Any]], list[Any]]:
        def body(lane: LaneTrace, arg_tracers: Sequence[Any]) -> list[Any]:
            recorder.lane = lane
            args, kwargs = call.rebuild(arg_tracers)
            push_watcher(recorder)
            try:
                out = self.fn(*args, **kwargs)
            finally:
                pop_watcher(recorder)
            return collect_outputs(self.api, out, recorder, outputs)

        return body

    def _assemble(
        self,
        call: Call,
        lane: LaneJaxpr,
        recorder: LaneRecorder,
        outputs: LaneOutputs,
        decisions: Decisions,
        program: Callable[..., Sequence[Any]],
        size: int = 1,
        origin: str = "",
        donated: tuple[int, ...] = (),
    ) -> Plan:
        """The plan of a traced call: its states, how they leave, and the compiled ``program``."""
        prototypes: IdentityDict[State, State] = IdentityDict()
        for state, _, _ in outputs.made:
            prototypes[state] = detached(state)
        slots = tuple(
            None if s is None else prototypes[s] if s in prototypes else weakref.ref(s) for s in outputs.out_slots
        )
        return Plan(
            refs=tuple(self._plans.ref(s) for s in recorder.inputs),
            arg_refs=tuple(self._plans.ref(s) for _, s in call.state_args),
            ins=tuple(recorder.inputs.values()),
            state_avals=tuple(map(shapes_of, recorder.before.values())),
            outs=decisions.outs,
            made=decisions.made,
            advanced=decisions.advanced,
            prototypes=tuple(prototypes.values()),
            out_tree=outputs.out_tree,
            out_slots=slots,
            num_user_leaves=outputs.num_user_leaves,
            program=program,
            effects=lane.has_effects,
            axis_size=size,
            size_origin=origin,
            refusal=decisions.refusal,
            warnings=decisions.warnings,
            donated_states=donated,
        )

    def _compile(self, plan: Plan, call: Call) -> None:
        """Fill ``jax.jit``'s caches for this call, so the first run (under the run lock) only dispatches.

        Inside another trace there is nothing to compile; failures are left for the run to report.
        """
        if current_watcher() is not None:
            return
        try:
            inputs = plan.inputs(call.leaves, plan.values(None))
            if not any(isinstance(x, jax.core.Tracer) for x in inputs):
                plan.program.lower(*inputs).compile()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 (reported by the run, see above)
            pass

    def _fits(self, plan: Plan) -> bool:
        states = plan.states()
        return states is not None and plan.fits([read_through(current_watcher(), s) for s in states])

    def _run(self, plan: Plan, call: Call, made: list[State] | None) -> Any:
        if plan.arg_refs and not call.passes(plan.arg_refs):
            raise StalePlan()
        watcher = current_watcher()
        values = plan.values(watcher)
        if (plan.checks or not self.programs_check_inputs) and not plan.fits(values):
            raise StalePlan()
        if plan.refusal is not None:
            raise BatchAxisError(plan.refusal)
        outside = at_eval_trace()
        if watcher is None and plan.refs and not outside and under_staging_trace():
            raise baked_error(self.api, cast(State, plan.refs[0]()))
        for message in plan.warnings:
            warn(message)
        return dispatch(self.api, plan, call.leaves, values, made, watcher, outside)

def _argnums(api: str, argname: str, argnums: Any) -> tuple[int, ...]:
    if isinstance(argnums, int) and not isinstance(argnums, bool):
        argnums = (argnums,)
    if not isinstance(argnums, (tuple, list)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in argnums
    ):
        raise TypeError(f"{api}: `{argname}` must be an int or a tuple of ints, got {argnums!r}.")
    return tuple(argnums)


def _argnames(api: str, argnames: Any) -> tuple[str, ...]:
    if isinstance(argnames, str):
        argnames = (argnames,)
    if not isinstance(argnames, (tuple, list)) or not all(isinstance(n, str) for n in argnames):
        raise TypeError(f"{api}: `static_argnames` must be a str or a tuple of str, got {argnames!r}.")
    return tuple(argnames)
