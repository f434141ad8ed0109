"""statemap: JAX's mapping transforms for functions that read and write mutable state."""

from . import errors as errors
from . import filters as filters
from . import random as random
from ._mapping import MapSpec as MapSpec
from ._mapping import StatefulMapping as StatefulMapping
from ._pmap import PMapMapping as PMapMapping
from ._pmap import pmap as pmap
from ._random import RandomState as RandomState
from ._state import HiddenState as HiddenState
from ._state import LongTermState as LongTermState
from ._state import ParamState as ParamState
from ._state import ShortTermState as ShortTermState
from ._state import State as State
from ._trace import StateTrace as StateTrace
from ._vmap import VMapMapping as VMapMapping
from ._vmap import vmap as vmap
from .errors import BatchAxisError as BatchAxisError
from .errors import StatemapError as StatemapError

vmap2 = vmap
pmap2 = pmap

__all__ = [
    "BatchAxisError",
    "HiddenState",
    "LongTermState",
    "MapSpec",
    "PMapMapping",
    "ParamState",
    "RandomState",
    "ShortTermState",
    "State",
    "StateTrace",
    "StatefulMapping",
    "StatemapError",
    "VMapMapping",
    "errors",
    "filters",
    "pmap",
    "pmap2",
    "random",
    "vmap",
    "vmap2",
]
