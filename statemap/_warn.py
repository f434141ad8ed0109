"""Warnings that point at the user's code, however deep in statemap they are raised."""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType

__all__ = ["warn"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def warn(message: str) -> None:
    """``warnings.warn(message, UserWarning)``, attributed to the first caller outside statemap.

    Then Python's default filters show it once per line of the user's code
    (a call site, or the line of a traced function that touched the state),
    and that line is the one the warning names.

    Example:
      >>> import warnings
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter("always")
      ...     warn("a plan was dropped")
      >>> caught[0].message.args[0], caught[0].filename.startswith(_PACKAGE)  # here, not in statemap
      ('a plan was dropped', False)
    """
    frame: FrameType | None = sys._getframe(1)  # the caller: ``stacklevel=2`` of this ``warnings.warn``
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)
