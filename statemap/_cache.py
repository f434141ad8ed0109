"""The per-signature plan cache: bounded, and blind to garbage-collected states."""

from __future__ import annotations

import collections
import weakref
from collections.abc import Hashable

from ._plan import Plan
from ._state import State

__all__ = ["PlanCache"]


class PlanCache:
    """Plans by call signature, least recently used first out.

    A signature holds a few plans (one per set of state shapes seen). Plans
    refer to states weakly; when a state dies, every plan that reads it goes.
    """

    def __init__(self, max_signatures: int = 64, plans_per_signature: int = 4):
        self._plans: collections.OrderedDict[Hashable, list[Plan]] = collections.OrderedDict()
        self._max_signatures = max_signatures
        self._plans_per_signature = plans_per_signature
        # Set by weakref callbacks, which may run in any thread at any time;
        # the pruning itself happens in the calling thread, under its lock.
        self._dead = False

    def __len__(self) -> int:
        if self._dead:
            self._prune()
        return sum(len(plans) for plans in self._plans.values())

    def get(self, key: Hashable) -> tuple[Plan, ...]:
        """The plans for ``key``, most recently used first (a copy, safe to discard from)."""
        if self._dead:
            self._prune()
        plans = self._plans.get(key)
        if not plans:
            return ()
        self._plans.move_to_end(key)
        return tuple(plans)

    def add(self, key: Hashable, plan: Plan) -> None:
        """Keep ``plan`` for ``key``, evicting the oldest signature or plan beyond the bounds."""
        plans = self._plans.setdefault(key, [])
        plans.insert(0, plan)
        del plans[self._plans_per_signature :]
        self._plans.move_to_end(key)
        while len(self._plans) > self._max_signatures:
            self._plans.popitem(last=False)

    def promote(self, key: Hashable, plan: Plan) -> None:
        """Try ``plan`` first for ``key`` from now on."""
        plans = self._plans.get(key, [])
        if plan in plans:
            plans.remove(plan)
            plans.insert(0, plan)

    def discard(self, key: Hashable, plan: Plan) -> None:
        """Forget ``plan``."""
        plans = self._plans.get(key, [])
        if plan in plans:
            plans.remove(plan)
        if not plans:
            self._plans.pop(key, None)

    def ref(self, state: State) -> weakref.ref:
        """A weak reference to ``state`` that prunes dead plans when it dies."""
        return weakref.ref(state, self._died)

    def _died(self, _: weakref.ref) -> None:
        self._dead = True

    def _prune(self) -> None:
        self._dead = False
        for key in list(self._plans):
            alive = [p for p in self._plans[key] if p.states() is not None]
            if alive:
                self._plans[key] = alive
            else:
                del self._plans[key]
