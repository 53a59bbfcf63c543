"""backend: together: the training runs at Together AI's fine-tuning API.

One folder: ``client.py`` (the Together SDK behind one class: create-or-adopt, retrieve, events,
cancel, download; errors as reasons), ``builders.py`` (the upload and download Jobs),
``status.py`` (the pure reducer: observed Jobs and Together job -> status, children and calls),
``handlers.py`` (kopf glue: observe, the calls, a poll timer, the cancel on delete) and ``pod.py``
(what runs in the upload/download pods: ``python -m tuneop.backends.together.pod``).
"""
from __future__ import annotations

from typing import Any, Optional

import kopf

from ... import kube
from ... import status as st
from ...api.finetunejob import FineTuneJobSpec
from ..base import Host, ReduceOptions
from . import builders, handlers
from . import status as TS


class TogetherBackend:
    name = "together"
    prefetch = False  # its children differ from kubernetes' (observe reads them)

    def check(self, spec: FineTuneJobSpec) -> list[str]:
        return []  # what Together cannot do is a terminal UnsupportedByBackend of its reducer

    def children(self, ftj: dict[str, Any], spec: FineTuneJobSpec, *, image: str) -> list[dict[str, Any]]:
        return builders.build_children(ftj, spec, image=image)

    async def observe(
        self, host: Host, kc: kube.KubeClient, body: dict[str, Any], spec: FineTuneJobSpec,
        children: Optional[list[Any]] = None,
    ) -> st.Observed:
        return await handlers.observe(host, kc, body, spec)

    def reconcile(self, start: st.Start, options: ReduceOptions) -> st.Decision:
        return TS.reconcile_together(
            start.bld, start.body, start.spec, start.h, start.obs, image=options.image,
            base_url=options.together_base_url,
        )

    async def act(
        self, host: Host, kc: kube.KubeClient, body: dict[str, Any], decision: st.Decision, logger: Any
    ) -> None:
        if decision.calls:
            await handlers.run_actions(host, kc, body, decision, logger)

    def register(self, host: Host, registry: kopf.OperatorRegistry, resource: tuple[str, str, str]) -> None:
        handlers.register(host, registry, resource)


BACKEND = TogetherBackend()
