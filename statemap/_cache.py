"""The per-signature plan cache: bounded, and blind to garbage-collected states."""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any

from ._plan import Plan
from ._shortcut import Shortcut
from ._state import State
from ._warn import warn

__all__ = ["PlanCache", "shared_plans"]


class PlanCache:
    """Plans by call signature, least recently used first out.

    A signature holds a few plans (one per set of state shapes seen). Plans
    refer to states weakly; when a state dies, every plan that reads it goes.
    """

    def __init__(self, max_signatures: int = 4096, plans_per_signature: int = 4, owner: str = "a transform"):
        self._plans: collections.OrderedDict[Hashable, list[Plan]] = collections.OrderedDict()
        self._max_signatures = max_signatures
        self._plans_per_signature = plans_per_signature
        self._owner = owner
        self._warned = False
        # Held while a plan is traced and compiled: one build at a time per
        # cache, and a thread needing a plan being built waits for it.
        self.building = threading.RLock()
        # Set by weakref callbacks, which may run in any thread at any time;
        # the pruning itself happens in the calling thread, under its lock.
        self._dead = False
        self.shortcut: Shortcut | None = None
        """How the last warm call can be repeated without a plan lookup."""
        self.trusting = True
        """Whether shortcuts may leave their signature check to the programs; cleared the first time
        that failed, as calls whose signatures change keep failing (see ``Shortcut``)."""

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
            self._warn_full()

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
        if self.shortcut is not None and self.shortcut.plan is plan:
            self.shortcut = None

    def clear(self) -> None:
        """Forget every plan."""
        with self.building:
            self._plans.clear()
            self.shortcut = None
            self.trusting = True

    def ref(self, state: State) -> weakref.ref:
        """A weak reference to ``state`` that prunes dead plans when it dies."""
        return weakref.ref(state, self._died)

    def _warn_full(self) -> None:
        if self._warned:
            return
        self._warned = True
        warn(
            f"{self._owner} has seen more than {self._max_signatures} call signatures (argument "
            f"shapes, dtypes and static values); the least recently used plans are dropped and "
            f"will be traced and compiled again. If the signatures repeat, raise the capacity "
            f"(`statemap.StatefulTransform.plan_capacity = n`, before building the transform); "
            f"if they keep changing (a new batch size every call), pad inputs to a few sizes."
        )

    def _died(self, _: weakref.ref) -> None:
        self._dead = True

    def _prune(self) -> None:
        self._dead = False
        if self.shortcut is not None and self.shortcut.plan.states() is None:
            self.shortcut = None
        for key in list(self._plans):
            alive = [p for p in self._plans[key] if p.states() is not None]
            if alive:
                self._plans[key] = alive
            else:
                del self._plans[key]


# Plan caches by function identity, then by the transform's type and options:
# a transform rebuilt around the same function with the same options (the
# ``statemap.vmap(f)(x)``-inside-a-step idiom) reuses the earlier one's plans,
# as ``jax.jit(f)`` does. Identity, not equality: two objects that compare
# equal may close over different states. A function keeps the caches of its
# last ``OPTIONS_PER_FUNCTION`` sets of options (a filter naming a new state
# each step is a new set): older ones go with their plans.
_SHARED: dict[int, collections.OrderedDict[Hashable, PlanCache]] = {}
_SHARED_LOCK = threading.Lock()  # two threads building the same transform get one cache
OPTIONS_PER_FUNCTION = 16


def shared_plans(fn: Callable[..., Any], options: Hashable, make: Callable[[], PlanCache]) -> PlanCache:
    """The plan cache of transforms of ``fn`` with ``options``; a private one if they cannot be keyed."""
    with _SHARED_LOCK:
        by_options = _SHARED.get(id(fn))
        try:
            hash(options)
            if by_options is None:
                weakref.finalize(fn, _SHARED.pop, id(fn), None)
                by_options = _SHARED[id(fn)] = collections.OrderedDict()
        except TypeError:  # unhashable options, or a function without weak references
            return make()
        cache = by_options.get(options)
        if cache is None:
            cache = by_options[options] = make()
            while len(by_options) > OPTIONS_PER_FUNCTION:
                by_options.popitem(last=False)
        by_options.move_to_end(options)
        return cache
