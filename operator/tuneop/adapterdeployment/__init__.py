"""AdapterDeployment: its builders (``builders.py``: Deployment, Service, HPA; ``vllm.py``: the vLLM
server's arguments and environment), its reducer (``reconcile.py``: desired adapters, the load/unload
plan, status; ``basemodel.py``: which adapters fit the served base model) and its kopf glue
(``handlers.py``)."""
