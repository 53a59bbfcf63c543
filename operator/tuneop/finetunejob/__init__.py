"""FineTuneJob: its builders (``builders.py``: the children of backend kubernetes), its reducer
(``reconcile.py``: what every backend shares and backend kubernetes' own) and its kopf glue
(``handlers.py``). Backends: ``tuneop.backends``."""
