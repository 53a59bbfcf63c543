"""What a FineTuneJob backend is, and the registry of backends.

A backend turns a FineTuneJob into work somewhere (Jobs on this cluster, a hosted fine-tuning API)
and the work's state back into the FineTuneJob's status. The FineTuneJob glue
(``finetunejob/handlers.py``) owns everything shared: the kopf loop, the per-object lock, reading
the FineTuneJob, applying a :class:`~tuneop.finetunejob.reconcile.Decision` (deletes, creates, patches, status,
Events), metrics. A backend brings five things (:class:`FineTuneBackend`):

- ``check(spec)``: what this backend cannot do with a valid spec, as ``field: message`` lines
  (the status says SpecInvalid and names the field);
- ``children(ftj, spec, image=)``: the objects it creates (``tuneop render``);
- ``observe(host, kc, body, spec)``: reads what exists (its children, its remote job);
- ``reconcile(start, options)``: pure: what exists -> the status it implies and the children to
  create or delete (a :class:`~tuneop.finetunejob.reconcile.Decision`);
- ``act(host, kc, body, decision, logger)``: calls outside Kubernetes that the decision asks for
  (made after its status is written), and ``register(host, registry, resource)``: kopf handlers
  of its own (a poll timer, a cancel on delete).

Adding a backend is one module or package under ``tuneop/backends/`` plus one line in
``tuneop/backends/registered.py`` (``register(...)``); ``tests/integration/test_backend_plugin.py``
runs one written against this protocol through the real kopf loop.
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, AsyncContextManager, Awaitable, Callable, Optional, Protocol, runtime_checkable

import kopf

from .. import kube
from ..api import finetunejob as api
from ..api.finetunejob import FineTuneJobSpec
from ..dataset import check_lines
from ..finetunejob import reconcile as st

# ConfigMap datasets up to this size are checked in the event loop (a thread hop costs more than
# checking a few hundred rows); larger ones (up to the 1 MiB a ConfigMap holds) in a thread.
INLINE_CHECK_MAX_CHARS = 64 * 1024


async def check_inline_dataset(text: str, declared: str, source: str) -> dict[str, Any]:
    def check() -> dict[str, Any]:
        return check_lines(text, declared=declared, max_errors=10, source=source).to_dict()

    if len(text) <= INLINE_CHECK_MAX_CHARS:
        return check()
    return await asyncio.get_running_loop().run_in_executor(None, check)


async def gather(*aws: Any) -> list[Any]:
    """asyncio.gather that waits for every read and then raises the first error (no read is
    left running unobserved)."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)


@dataclasses.dataclass(frozen=True)
class ReduceOptions:
    """The operator's settings a reducer may use (all data; no clients)."""

    image: str
    together_base_url: Optional[str] = None
    trainer_defaults: Optional[dict[str, Any]] = None
    # USD per GPU-hour by GPU resource name (nvidia.com/gpu): the cost estimate (tuneop/cost.py).
    gpu_prices: Optional[dict[str, float]] = None


@dataclasses.dataclass
class Host:
    """What the FineTuneJob glue lends a backend's own kopf glue (no module reaches into another's
    globals): the operator's settings and the shared steps of a reconcile."""

    config: Any  # finetunejob.handlers.OperatorConfig
    api_version: str
    kind: str
    prefix: str
    now: Callable[[], str]
    lock: Callable[[str, str], AsyncContextManager[Any]]
    reconcile: Callable[[str, str, Any], Awaitable[bool]]  # (namespace, name, logger) -> reachable
    apply: Callable[[kube.KubeClient, dict[str, Any], st.Decision], Awaitable[Any]]


class FineTuneBackend(Protocol):
    name: str
    # The glue may read this backend's children together with the FineTuneJob (children_reads).
    prefetch: bool

    def check(self, spec: FineTuneJobSpec) -> list[str]: ...

    def children(self, ftj: dict[str, Any], spec: FineTuneJobSpec, *, image: str) -> list[dict[str, Any]]: ...

    async def observe(
        self, host: Host, kc: kube.KubeClient, body: dict[str, Any], spec: FineTuneJobSpec,
        children: Optional[list[Any]] = None,
    ) -> st.Observed: ...

    def reconcile(self, start: st.Start, options: ReduceOptions) -> st.Decision: ...

    async def act(
        self, host: Host, kc: kube.KubeClient, body: dict[str, Any], decision: st.Decision, logger: Any
    ) -> None: ...

    def register(self, host: Host, registry: kopf.OperatorRegistry, resource: tuple[str, str, str]) -> None: ...


@runtime_checkable
class ReadsAhead(Protocol):
    """A backend may also start, from the watch event of a FineTuneJob nothing has reconciled yet,
    the reads its :meth:`FineTuneBackend.observe` will make first: the reconcile kopf runs next
    joins them in flight (:meth:`tuneop.kube.KubeClient.read_ahead`). Nothing is decided there."""

    def read_ahead(self, kc: kube.KubeClient, body: dict[str, Any], spec: FineTuneJobSpec) -> None: ...


_REGISTRY: dict[str, FineTuneBackend] = {}


def register(backend: FineTuneBackend) -> FineTuneBackend:
    """Make ``backend`` the one FineTuneJobs name with ``spec.backend: <backend.name>``."""
    _REGISTRY[backend.name] = backend
    if backend.name not in api.BACKEND_NAMES:
        api.BACKEND_NAMES.append(backend.name)
    return backend


def unregister(name: str) -> None:
    """Forget a backend (tests); the built-in names stay valid in the API."""
    _REGISTRY.pop(name, None)
    if name in api.BACKEND_NAMES and name not in {b.value for b in api.Backend}:
        api.BACKEND_NAMES.remove(name)


def get(name: str) -> FineTuneBackend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no FineTuneJob backend {name!r} is registered (registered: {', '.join(_REGISTRY)})") from None


def names() -> list[str]:
    return list(_REGISTRY)


def reconcile(
    body: dict[str, Any], observed: st.Observed | dict[str, Any], *, image: str, now: str,
    together_base_url: Optional[str] = None,
    trainer_defaults: Optional[dict[str, Any]] = None,
    gpu_prices: Optional[dict[str, float]] = None,
) -> st.Decision:
    """The FineTuneJob `body` + what exists -> actions, new status and events: the checks every
    backend shares (:func:`tuneop.finetunejob.reconcile.begin`), then the backend's own check and reducer.
    ``together_base_url``: the Together endpoint the upload/download pods use (None: default).
    ``trainer_defaults``: the platform's defaults for training pods (workload_defaults).
    ``gpu_prices``: USD per GPU-hour by GPU resource name (the cost estimate)."""
    start = st.begin(body, observed, now=now)
    if isinstance(start, st.Decision):
        return start
    backend = get(start.spec.backend)
    problems = backend.check(start.spec)
    if problems:
        start.bld.status.pop("specHash", None)
        return start.bld.fail(st.SPEC_INVALID, f"invalid spec: {'; '.join(problems)}", invalid=True)
    return backend.reconcile(
        start, ReduceOptions(image=image, together_base_url=together_base_url, trainer_defaults=trainer_defaults,
                             gpu_prices=gpu_prices)
    )


def children(ftj: dict[str, Any], spec: Optional[FineTuneJobSpec] = None, *, image: str) -> list[dict[str, Any]]:
    """Every object tuneop creates for the FineTuneJob `ftj` (``tuneop render``)."""
    spec = spec if spec is not None else st.spec_of(ftj)
    return get(spec.backend).children(ftj, spec, image=image)
