"""The shortcut: a transform's last warm call, recognised without building a ``Call``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax

from ._jax_internals import at_eval_trace, fast_aval, settings_jit_ignores, trace_settings
from ._plan import Plan
from ._state import current_watcher

if TYPE_CHECKING:
    from ._call import Call
    from ._transform import StatefulTransform

__all__ = ["Shortcut"]


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
    ``StalePlan`` (see ``TRUSTED``) instead of tracing. Calls with static or
    State arguments, and plans that warn, refuse or have effects, always
    take the long way.
    """

    __slots__ = ("plan", "trusted", "num_args", "flat", "treedef", "avals", "settings", "jit_ignored")

    def __init__(self, plan: Plan, call: Call, trusted: bool):
        self.plan = plan
        self.trusted = trusted
        self.num_args = call.num_args
        self.flat = len(call.leaves) == call.num_args and all(a is x for a, x in zip(call.dynamic, call.leaves))
        self.treedef: Any = jax.tree.structure(call.dynamic)
        self.avals = tuple(map(fast_aval, call.leaves))
        self.settings = call.settings
        self.jit_ignored = settings_jit_ignores()

    @classmethod
    def of(cls, transform: StatefulTransform, call: Call, plan: Plan) -> Shortcut | None:
        """The shortcut to ``plan`` for calls like ``call``, or None if such calls must take the long way."""
        simple = not (transform.static_argnums or transform.static_argnames or call.state_args or call.num_kwargs)
        if simple and not (plan.checks or plan.effects or plan.arg_refs):
            return cls(plan, call, transform.programs_check_inputs)
        return None

    def leaves(self, args: tuple) -> Sequence[Any] | None:
        """The argument leaves of a call with positional ``args`` if it may run the plan, else None."""
        if len(args) != self.num_args or current_watcher() is not None or not at_eval_trace():
            return None
        if self.flat:
            leaves: Sequence[Any] = args
        else:
            leaves, treedef = jax.tree.flatten(args)
            if self.treedef != treedef:
                return None
        if self.trusted:
            return leaves if settings_jit_ignores() == self.jit_ignored else None
        try:
            if tuple(map(fast_aval, leaves)) != self.avals:
                return None
        except TypeError:  # a State, or another non-array argument
            return None
        return leaves if trace_settings() == self.settings else None
