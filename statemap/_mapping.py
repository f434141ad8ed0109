"""StatefulMapping: the engine every stateful mapping shares."""

from __future__ import annotations

import abc
import threading
import warnings
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import attrs
import jax

from ._axes import StateAxes, check_axes_tree, leaf_axes
from ._cache import PlanCache
from ._call import Call
from ._catalogue import LaneRecorder, SizeSources
from ._explain import Explanation
from ._jax_internals import AxisSizeNeeded, trace_lane
from ._plan import Plan, StalePlan, shapes_of
from ._planner import (
    LaneOutputs,
    collect_outputs,
    decide_outputs,
    make_lane_fn,
    normalise_out_axes,
    probe_batched,
    state_in_axes_per_leaf,
)
from ._policy import PolicyName, WritePolicy
from ._state import State, current_watcher, describe, drop_watcher, pop_watcher, push_watcher, read_through
from ._writeback import commit, detached
from .errors import BatchAxisError, StatemapError

__all__ = ["MISSING", "MapSpec", "StatefulMapping"]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
"""The default of ``fn`` in ``vmap``/``pmap``: without a function they return a decorator."""

# One call at a time: two threads writing the same state must not interleave.
_CALL_LOCK = threading.RLock()


@attrs.frozen
class MapSpec:
    """What a subclass's ``_map`` hook receives.

    Attributes:
      lane_fn: ``lane_fn(lane_index, *inputs) -> list of outputs`` for one lane;
        ``lane_index`` is the lane's position (an int32 scalar, traced).
      in_axes: one axis (or None) per flat input.
      out_axes: one axis (or None: the same on every lane) per flat output.
      axis_size: the number of lanes.
      axis_name: the name collectives in the function use.
      donated: positions of inputs whose buffers may be donated.

    Example:
      >>> import statemap
      >>> spec = statemap.MapSpec(lambda i, x: [x], in_axes=(0,), out_axes=[0],
      ...                         axis_size=3, axis_name='i')
      >>> spec.lane_fn(0, 'x'), spec.donated
      (['x'], ())
    """

    lane_fn: Callable[..., list[Any]]
    in_axes: tuple[int | None, ...]
    out_axes: list[int | None]
    axis_size: int
    axis_name: Hashable
    donated: tuple[int, ...] = ()


class StatefulMapping(abc.ABC):
    """A JAX mapping transform over a function that reads and writes ``State`` objects.

    The base owns everything shared: validating the axis specs and write policy,
    tracing the function once per call signature to catalogue the states it
    touches, the plan cache, batched-ness and policy decisions, per-lane keys,
    and the all-or-nothing write-back. A subclass supplies three hooks:
    ``_map`` (the primitive), ``_resolve_axis_size`` (defaults and limits) and,
    optionally, ``_lane_key`` (how a lane derives its key).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import statemap
      >>> class SequentialMapping(statemap.StatefulMapping):
      ...     api = 'SequentialMapping'
      ...     def _map(self, spec):
      ...         def run(*inputs):
      ...             def one(i):
      ...                 picked = [x if a is None else jnp.take(x, i, axis=a)
      ...                           for x, a in zip(inputs, spec.in_axes)]
      ...                 return spec.lane_fn(i, *picked)
      ...             outs = jax.lax.map(one, jnp.arange(spec.axis_size))
      ...             return [o[0] if a is None else jnp.moveaxis(o, 0, a)
      ...                     for o, a in zip(outs, spec.out_axes)]
      ...         return jax.jit(run)
      ...     def _resolve_axis_size(self, size):
      ...         return size
      >>> scale = statemap.State(jnp.float32(3.0), name='scale')
      >>> SequentialMapping(lambda x: x * scale.value)(jnp.arange(3.0))
      Array([0., 3., 6.], dtype=float32)
    """

    api: str = "statemap.StatefulMapping"
    default_size_origin: str = "the mapping's default"

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        in_axes: Any = 0,
        out_axes: Any = 0,
        axis_name: Hashable | None = None,
        axis_size: int | None = None,
        state_in_axes: Any = None,
        state_out_axes: Any = None,
        unexpected_out_state_mapping: PolicyName | str = "raise",
        static_argnums: int | Sequence[int] = (),
        donate_argnums: int | Sequence[int] = (),
    ):
        api = self.api
        if not callable(fn):
            raise TypeError(f"{api}: `fn` must be callable, got {type(fn).__name__}: {fn!r}.")
        check_axes_tree(api, "in_axes", in_axes)
        check_axes_tree(api, "out_axes", out_axes)
        if axis_size is not None and (not isinstance(axis_size, int) or isinstance(axis_size, bool) or axis_size < 1):
            raise ValueError(f"{api}: `axis_size` must be a positive int or None, got {axis_size!r}.")
        if axis_name is not None:
            try:
                hash(axis_name)
            except TypeError:
                raise TypeError(f"{api}: `axis_name` must be hashable, got {axis_name!r}.") from None
        self.fn = fn
        self.in_axes = in_axes
        self.out_axes = out_axes
        self.axis_name = axis_name
        self.axis_size = axis_size
        self.state_in_axes = StateAxes.parse(api, "state_in_axes", state_in_axes)
        self.state_out_axes = StateAxes.parse(api, "state_out_axes", state_out_axes)
        self.policy = WritePolicy.parse(api, unexpected_out_state_mapping)
        self.static_argnums = _argnums(api, "static_broadcasted_argnums", static_argnums)
        self.donate_argnums = _argnums(api, "donate_argnums", donate_argnums)
        # One private name for every unnamed mapping: nested maps shadow it, as
        # JAX allows, and JAX's caches keyed by axis names do not grow per mapping.
        self._lane_axis = axis_name if axis_name is not None else "statemap-lane"
        self._plans = PlanCache()
        self.__wrapped__ = fn
        self.__name__ = getattr(fn, "__name__", type(self).__name__)
        self.__doc__ = getattr(fn, "__doc__", None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__name__}, axis_name={self.axis_name!r})"

    # Hooks for subclasses.

    @abc.abstractmethod
    def _map(self, spec: MapSpec) -> Callable[..., Sequence[Any]]:
        """Return a compiled callable mapping ``spec.lane_fn`` over ``spec.axis_size`` lanes.

        It receives the flat inputs, each mapped on its ``spec.in_axes`` entry
        (None: the same value for every lane), must call ``spec.lane_fn`` with
        the lane's index first, and returns the flat outputs, stacked on their
        ``spec.out_axes`` entry (None: the value is the same on every lane, which
        the base has verified, so any lane's copy will do).
        """

    @abc.abstractmethod
    def _resolve_axis_size(self, size: int | None) -> int:
        """Return the number of lanes, given the size arguments and states imply.

        ``size`` is None when nothing mapped fixes it: return a default or raise
        ``ValueError``. Raise ``ValueError`` too for a size the mapping cannot run.
        """

    def _lane_key(self, key: jax.Array, lane_index: jax.Array) -> jax.Array:
        """The key lane ``lane_index`` uses, derived inside the compiled program.

        ``fold_in(key, i)`` equals ``split(key, n)[i]`` bit for bit, so every
        mapping that keeps this default gives lane i the same key.
        """
        return jax.random.fold_in(key, lane_index)

    def _explain_lines(self, plan: Plan) -> list[str]:
        """Extra lines for ``explain()`` (devices, for instance); none by default."""
        return []

    # The call.

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = Call(self, args, kwargs)
        with _CALL_LOCK:
            for rank, plan in enumerate(self._plans.get(call.key)):
                try:
                    out = self._run(plan, call, None)
                except StalePlan:
                    if plan.states() is None:
                        self._plans.discard(call.key, plan)
                    continue
                if rank:
                    self._plans.promote(call.key, plan)
                return out
            plan, made = self._build(call)
            self._plans.add(call.key, plan)
            return self._run(plan, call, made)

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
          >>> print(step.explain(jnp.ones((4, 2))))  # doctest: +NORMALIZE_WHITESPACE
          statemap.vmap plan for <lambda>: 4 lanes (axis size from argument args[0], axis 0)
          state                     enters           leaves
          HiddenState 'h' (4, 2)    split on axis 0  unchanged
        """
        call = Call(self, args, kwargs)
        with _CALL_LOCK:
            plan = next((p for p in self._plans.get(call.key) if self._fits(p)), None)
            if plan is None:
                plan, _ = self._build(call)
                self._plans.add(call.key, plan)
        return Explanation(self.api, self.__name__, plan, self._explain_lines(plan))

    def _build(self, call: Call) -> tuple[Plan, list[State]]:
        hint = None if call.sizes.size is None else self._resolve_axis_size(call.sizes.size)
        sizes = call.sizes.copy()
        try:
            lane, recorder, outputs = self._trace(call, sizes, hint)
        except AxisSizeNeeded:
            # The function needed the size while tracing (``psum`` of a constant,
            # ``axis_size``) and only split states give it: trace again with it.
            try:
                hint = self._resolve_axis_size(sizes.size)
            except ValueError:
                raise ValueError(
                    f"{self.api}: the function needs the axis size while it is traced "
                    f"(`jax.lax.psum` of a constant, `jax.lax.axis_size`), before any mapped "
                    f"argument or split state gives it. Pass `axis_size=n`."
                ) from None
            sizes = call.sizes.copy()
            lane, recorder, outputs = self._trace(call, sizes, hint)
        size = self._resolve_axis_size(sizes.size)
        origin = sizes.origin or self.default_size_origin
        return self._make_plan(call, lane, recorder, outputs, size, origin), list(recorder.made)

    def _trace(self, call: Call, sizes: SizeSources, hint: int | None) -> tuple[Any, LaneRecorder, LaneOutputs]:
        recorder = LaneRecorder(self.api, self.state_in_axes, sizes, current_watcher(), call.state_arg_axes)
        outputs = LaneOutputs()
        try:
            lane = trace_lane(self._lane_body(call, recorder, outputs), call.lane_avals, self._lane_axis, hint)
        finally:
            drop_watcher(recorder)  # in case an interrupt landed between push and try
            for state in recorder.made:
                state._value = None
        return lane, recorder, outputs

    def _lane_body(self, call: Call, recorder: LaneRecorder, outputs: LaneOutputs) -> Callable[..., list[Any]]:
        def body(new_input: Callable[[Any], Any], arg_tracers: Sequence[Any]) -> list[Any]:
            recorder.new_input = new_input
            args, kwargs = call.rebuild(arg_tracers)
            push_watcher(recorder)
            try:
                out = self.fn(*args, **kwargs)
            finally:
                pop_watcher(recorder)
            return collect_outputs(self.api, out, recorder, outputs)

        return body

    def _make_plan(
        self, call: Call, lane: Any, recorder: LaneRecorder, outputs: LaneOutputs, size: int, origin: str
    ) -> Plan:
        ins = list(recorder.inputs.values())
        in_axes = (*call.leaf_axes, *state_in_axes_per_leaf(ins))
        lane_fn = make_lane_fn(lane, len(call.leaves), ins, self._lane_key)
        user_avals = lane.out_avals[: outputs.num_user_leaves]
        user_axes = normalise_out_axes(self.api, self._user_out_axes(outputs), user_avals)
        inputs = [*call.leaves, *(leaf for value in recorder.before.values() for leaf in jax.tree.leaves(value))]
        decisions = decide_outputs(
            self.api, lane, recorder, outputs, user_axes, self.state_out_axes, self.policy,
            probe_batched(lane_fn, inputs, in_axes, self._lane_axis, size),
        )
        prototypes = {s: detached(s) for s, _, _ in outputs.made}
        slots = tuple(
            None if s is None else prototypes[s] if s in prototypes else weakref.ref(s) for s in outputs.out_slots
        )
        spec = MapSpec(lane_fn, in_axes, decisions.out_axes, size, self._lane_axis, call.donated_leaves)
        return Plan(
            refs=tuple(self._plans.ref(s) for s in recorder.inputs),
            arg_refs=tuple(self._plans.ref(s) for _, s in call.state_args),
            ins=tuple(ins),
            state_avals=tuple(map(shapes_of, recorder.before.values())),
            outs=decisions.outs,
            made=decisions.made,
            advanced=decisions.advanced,
            prototypes=tuple(prototypes.values()),
            out_tree=outputs.out_tree,
            out_slots=slots,
            num_user_leaves=outputs.num_user_leaves,
            program=self._map(spec),
            effects=lane.has_effects,
            axis_size=size,
            size_origin=origin,
            refusal=decisions.refusal,
            warnings=decisions.warnings,
        )

    def _user_out_axes(self, outputs: LaneOutputs) -> list[int | None]:
        tree = jax.tree.unflatten(outputs.out_tree, [0] * len(outputs.out_slots))
        axes = leaf_axes(self.api, "out_axes", self.out_axes, tree, "outputs")
        return [axis for axis, slot in zip(axes, outputs.out_slots) if slot is None]

    def _fits(self, plan: Plan) -> bool:
        states = plan.states()
        return states is not None and plan.fits([read_through(current_watcher(), s) for s in states])

    def _run(self, plan: Plan, call: Call, made: list[State] | None) -> Any:
        states = plan.states()
        if states is None or (plan.arg_refs and not call.passes(plan.arg_refs)):
            raise StalePlan()
        watcher = current_watcher()
        values = [s._value for s in states] if watcher is None else [watcher.read(s) for s in states]
        if plan.refusal is not None or plan.warnings:
            if not plan.fits(values):
                raise StalePlan()
            if plan.refusal is not None:
                raise BatchAxisError(plan.refusal)
        inputs = list(call.leaves)
        for value, entry in zip(values, plan.ins):
            if entry.is_leaf:
                inputs.append(value)
                continue
            leaves, treedef = jax.tree.flatten(value)
            if treedef != entry.treedef:
                raise StalePlan()
            inputs += leaves
        for message in plan.warnings:
            warnings.warn(message, UserWarning, stacklevel=3)
        try:
            outs = plan.program(*inputs)
            if plan.effects:
                # A host callback may fail after dispatch: wait, so a failed call writes nothing.
                jax.block_until_ready(outs)
        except Exception as err:
            if not plan.fits(values):
                raise StalePlan() from None
            if "incompatible devices" in str(err):
                raise ValueError(f"{self.api}: incompatible devices: {_placement(call, states, values)}") from None
            raise
        if watcher is None and outs and isinstance(outs[0], jax.core.Tracer) and plan.writes:
            raise StatemapError(
                f"{self.api}: called inside a JAX transformation (jax.jit, jax.vmap, jax.grad, "
                f"...) that statemap does not manage, so the states it writes would be left "
                f"holding that transformation's tracers. Call the mapping outside it, or nest "
                f"statemap mappings (statemap.vmap inside statemap.pmap) instead."
            )
        return commit(plan, outs, made, watcher)


def _placement(call: Call, states: Sequence[State], values: Sequence[Any]) -> str:
    """Where the arguments and each input state live, for a devices error."""

    def devices(tree: Any) -> list[int]:
        return sorted({d.id for x in jax.tree.leaves(tree) if isinstance(x, jax.Array) for d in x.devices()})

    where = [f"{describe(s)} is on device(s) {devices(v)}" for s, v in zip(states, values)]
    return (
        f"the arguments are on device(s) {devices(call.leaves)}; " + "; ".join(where) + ". Move a "
        "state next to the arguments with `state.value = jax.device_put(state.value, device)`."
    )


def _argnums(api: str, argname: str, argnums: Any) -> tuple[int, ...]:
    if isinstance(argnums, int) and not isinstance(argnums, bool):
        argnums = (argnums,)
    if not isinstance(argnums, (tuple, list)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in argnums
    ):
        raise TypeError(f"{api}: `{argname}` must be an int or a tuple of ints, got {argnums!r}.")
    return tuple(argnums)
