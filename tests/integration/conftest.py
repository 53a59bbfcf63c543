"""Fixtures of the integration tests: see kmockenv.py."""
from kmockenv import api  # noqa: F401  (pytest fixture)
