"""Argument checks shared by the optimizers, the callback and the diagnostics.

Every check raises :class:`ValueError` naming the argument and the allowed range, so
library code stays importable (and testable) without Lightning.
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from numbers import Integral, Real
from pathlib import Path
from typing import Any


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_real(name: str, value: Any, *, low: float = -math.inf, high: float = math.inf,
               low_open: bool = False, high_open: bool = False, allow_inf: bool = False) -> float:
    """Return ``float(value)`` if it lies in the interval, else raise ``ValueError``.

    The interval is ``[low, high]`` with each end open when ``low_open`` / ``high_open``.
    NaN is always rejected; ``inf`` only when ``allow_inf``.
    """
    # An infinite end is shown open unless inf is accepted: "(0, inf)" then rejects inf consistently.
    lo = "(" if low_open or (math.isinf(low) and not allow_inf) else "["
    hi = ")" if high_open or (math.isinf(high) and not allow_inf) else "]"
    allowed = f"{lo}{low:g}, {high:g}{hi}"
    if not _is_real(value) or math.isnan(float(value)):
        raise ValueError(f"Invalid {name}: {value!r} (expected a real number in {allowed})")
    value = float(value)
    if math.isinf(value) and not allow_inf:
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number in {allowed})")
    if value < low or (low_open and value == low) or value > high or (high_open and value == high):
        raise ValueError(f"Invalid {name}: {value!r} (allowed range {allowed})")
    return value


def check_positive(name: str, value: Any) -> float:
    """``value`` must be a finite real number > 0."""
    return check_real(name, value, low=0.0, low_open=True)


def check_non_negative(name: str, value: Any) -> float:
    """``value`` must be a finite real number >= 0."""
    return check_real(name, value, low=0.0)


def check_int(name: str, value: Any, *, low: int = 0, allow_none: bool = False) -> int | None:
    """``value`` must be an integer >= ``low`` (any :class:`numbers.Integral`, e.g. ``numpy.int64``;
    not ``bool``), or ``None`` when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= {low})")
    return int(value)


def check_bool(name: str, value: Any, *, allow_none: bool = False) -> bool | None:
    """``value`` must be ``True`` or ``False`` (or ``None`` when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        expected = "True, False or None" if allow_none else "True or False"
        raise ValueError(f"Invalid {name}: {value!r} (expected {expected})")
    return value


def check_directory(name: str, value: Any, *, allow_none: bool = True, must_write: bool = False) -> Path | None:
    """``value`` must be a ``str`` / ``os.PathLike`` naming a folder (existing or not) that is not a
    file. With ``must_write``, the folder (or its nearest existing parent) must be writable.
    Nothing is created."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (str, os.PathLike)) or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"Invalid {name}: {value!r} (expected a folder path: a non-empty str or os.PathLike)")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"Invalid {name}: {str(path)!r} exists and is not a folder")
    if must_write:
        probe = path
        while not probe.exists():
            if probe.parent == probe:
                break
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise ValueError(f"Invalid {name}: {str(path)!r} is not writable (checked {str(probe)!r})")
    return path


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, choices))})")
    return value


def check_version(owner: str, state: Any, current: int, missing: int | None = None) -> int:
    """The ``"version"`` of a saved state (``missing`` when the key is absent), or :class:`ValueError` for
    one this release cannot read (a newer writer, or not a version at all)."""
    version = state.get("version", missing) if hasattr(state, "get") else None
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= current:
        raise ValueError(f"Invalid {owner} checkpoint version: {version!r} (this release reads versions 1 to {current}; "
                         "a newer version was written by a newer langevin-lora: upgrade it)")
    return version


def _internal(filename: str) -> bool:
    import torch

    return any(filename.startswith(os.path.dirname(m.__file__)) for m in (sys.modules["langevin_lora"], torch))


def warn_deprecated(message: str) -> None:
    """A :class:`DeprecationWarning` attributed to the user's line: the first frame outside this package and
    torch (a constructor's keyword reaches us through ``torch.optim.Optimizer.__init__``, for one)."""
    level, frame = 2, sys._getframe(1)   # stacklevel 2 is this function's caller
    while frame is not None and _internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, DeprecationWarning, stacklevel=level)
