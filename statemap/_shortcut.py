"""The shortcut: a transform's last warm call, repeated without building a ``Call``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax

from ._dispatch import RUN_LOCK, dispatch
from ._jax_internals import fast_aval, trace_settings, unkeyed_settings
from ._plan import TRUSTED, Plan, StalePlan
from ._state import current_watcher

if TYPE_CHECKING:
    from ._cache import PlanCache
    from ._call import Call
    from ._transform import StatefulTransform

__all__ = ["MISS", "Shortcut"]

MISS: Any = object()
"""What ``Shortcut.run`` returns when the call must take the long way."""


class Shortcut:
    """The signature of a transform's last warm call, and the plan that ran it.

    A later call whose ``Call`` key would be the same runs the same plan
    without building the key: positional arguments of the same structure
    and abstract values, no keyword arguments, the same JAX settings, and
    no JAX transform or state watcher around it. When the transform's
    programs check their inputs themselves (``programs_check_inputs``: a
    ``jax.jit`` runs only for the signatures it was traced for, and traces
    again for any other), the shortcut leaves the abstract values and the
    settings ``jax.jit`` keys on to the program, which then raises
    ``StalePlan`` (see ``TRUSTED``) instead of tracing. That failure costs
    milliseconds (JAX's own retrace), so the first one makes the plan cache
    stop trusting: calls whose signatures change keep changing. Calls with
    static or State arguments, and plans that warn, refuse or have effects,
    always take the long way.
    """

    __slots__ = ("api", "plans", "plan", "trusted", "num_args", "flat", "treedef", "avals", "settings", "unkeyed")

    def __init__(self, transform: StatefulTransform, plan: Plan, call: Call, plans: PlanCache):
        self.api = transform.api
        self.plans = plans
        self.plan = plan
        self.trusted = transform.programs_check_inputs and plans.trusting
        self.num_args = call.num_args
        self.flat = len(call.leaves) == call.num_args and all(a is x for a, x in zip(call.dynamic, call.leaves))
        self.treedef: Any = jax.tree.structure(call.dynamic)
        self.avals = call.avals
        self.settings = call.settings
        self.unkeyed = unkeyed_settings()

    @classmethod
    def of(cls, transform: StatefulTransform, call: Call, plan: Plan, plans: PlanCache) -> Shortcut | None:
        """The shortcut to ``plan`` (kept in ``plans``) for calls like ``call``, or None if they must take the long way."""
        simple = not (transform.static_argnums or transform.static_argnames or call.state_args or call.num_kwargs)
        if simple and call.outside and current_watcher() is None and not (plan.checks or plan.effects or plan.arg_refs):
            return cls(transform, plan, call, plans)
        return None

    def run(self, args: tuple) -> Any:
        """The output of a call with positional ``args``, or ``MISS`` if the long way must decide.

        One function, few calls: on this path each Python step counts.
        """
        if len(args) != self.num_args or current_watcher() is not None or unkeyed_settings() != self.unkeyed:
            return MISS
        leaves = args if self.flat else self._flattened(args)
        if leaves is None or not (self.trusted or self._same_signature(leaves)):
            return MISS
        plan, trusted = self.plan, self.trusted
        with RUN_LOCK:
            try:
                values = plan.values(None)
            except StalePlan:  # a state died
                return MISS
            if not (trusted or plan.fits(values)):
                return MISS
            previous = TRUSTED.active
            try:
                TRUSTED.active = trusted
                return dispatch(self.api, plan, leaves, values, trusted=trusted)
            except StalePlan:  # the program was given other inputs than it was built for
                if trusted:
                    self.plans.trusting = self.trusted = False
                return MISS
            finally:
                TRUSTED.active = previous

    def _flattened(self, args: tuple) -> Sequence[Any] | None:
        leaves, treedef = jax.tree.flatten(args)
        return leaves if self.treedef == treedef else None

    def _same_signature(self, leaves: Sequence[Any]) -> bool:
        """Whether ``leaves`` have the abstract values, and JAX the settings, of the shortcut's call."""
        try:
            return tuple(map(fast_aval, leaves)) == self.avals and trace_settings() == self.settings
        except TypeError:  # a State, or another non-array argument
            return False
