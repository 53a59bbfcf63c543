"""FineTuneJob backends: the protocol and the registry (``base.py``), the built-in backends
(``kubernetes.py``, ``together/``) and their registration (``registered.py``: import that module, not
``base``, to reconcile FineTuneJobs).

This package's ``__init__`` imports nothing: the code that runs inside pods
(``together/pod.py``) must not pull in the operator's side (kopf, the handlers).
"""
