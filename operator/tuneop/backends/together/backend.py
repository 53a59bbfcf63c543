"""The protocol object of backend together (registered in tuneop.backends.registered)."""
from __future__ import annotations

from typing import Any, Optional

import kopf

from ... import kube
from ...api.finetunejob import FineTuneJobSpec
from ...finetunejob import reconcile as st
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
