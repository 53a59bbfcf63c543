"""FineTuneJob backends: the protocol and registry (``base.py``) and the built-in backends.

Adding one: a module or package here implementing :class:`~tuneop.backends.base.FineTuneBackend`,
and one ``register(...)`` line below.
"""
from __future__ import annotations

from . import kubernetes, together
from .base import FineTuneBackend, Host, ReduceOptions, children, get, names, reconcile, register, unregister

register(kubernetes.BACKEND)
register(together.BACKEND)

__all__ = ["FineTuneBackend", "Host", "ReduceOptions", "children", "get", "names", "reconcile", "register", "unregister"]
