"""Filters select states: by type, tag, path, identity, or any predicate.

Wherever statemap takes a filter it accepts every form :func:`to_predicate`
normalises, so ``state_in_axes={0: statemap.ParamState}``,
``state_in_axes='batch_stats'`` and ``state_in_axes=[w, b]`` all work.
"""

from ._filters import All as All
from ._filters import Any as Any
from ._filters import Everything as Everything
from ._filters import Filter as Filter
from ._filters import Not as Not
from ._filters import Nothing as Nothing
from ._filters import OfType as OfType
from ._filters import PathContains as PathContains
from ._filters import Predicate as Predicate
from ._filters import WithTag as WithTag
from ._filters import to_predicate as to_predicate

__all__ = [
    "All",
    "Any",
    "Everything",
    "Filter",
    "Not",
    "Nothing",
    "OfType",
    "PathContains",
    "Predicate",
    "WithTag",
    "to_predicate",
]
