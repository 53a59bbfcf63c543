"""The backends tuneop ships, registered. Import this module (``from tuneop.backends import
registered as backends``) to reconcile FineTuneJobs: ``backends.reconcile``, ``backends.children``.

Adding a backend: a module or package beside ``kubernetes.py`` implementing
:class:`~tuneop.backends.base.FineTuneBackend`, and one ``register(...)`` line below.
"""
from __future__ import annotations

from . import kubernetes
from .base import (
    FineTuneBackend,
    Host,
    ReadsAhead,
    ReduceOptions,
    children,
    get,
    names,
    reconcile,
    register,
    unregister,
)
from .together import backend as together

register(kubernetes.BACKEND)
register(together.BACKEND)

__all__ = ["FineTuneBackend", "Host", "ReadsAhead", "ReduceOptions", "children", "get", "names", "reconcile", "register", "unregister"]
