"""kopf glue of backend: together (thin; decisions are in ``status.py`` beside it).

- :func:`observe`: the upload/download Jobs and their pods, missing dependencies, the operator's
  checks of ConfigMap datasets, and, while a Together job of the current spec is not finished,
  the job itself (``retrieve``) and its new events (``list_events`` after the cursor in status).
- :func:`run_actions`: the Together calls a decision asks for, made after its status was written:
  ``create`` (our finalizer first, then ``create_or_adopt`` with the suffix already recorded in
  status; the job id is patched into status right after) and ``cancel``.
- a timer (``together-monitor``, every ``together_poll_interval`` seconds while a Together job is
  active) reconciles, i.e. polls Together and mirrors its status and events.
- deleting a FineTuneJob whose Together job is active cancels it first (an ``on.delete`` handler,
  hence kopf's finalizer, only for such FineTuneJobs).

The API key is read from the Secret named in ``spec.together.apiKeySecretRef`` for each use, kept
in memory only, handed to the SDK client, and never logged, stored or put into an Event. The
synchronous SDK runs in worker threads (``asyncio.to_thread``).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import os
from typing import Any, Callable, Optional

import kopf

from ... import kube
from ...api.finetunejob import FineTuneJobSpec
from ...finetunejob import builders as b
from ...finetunejob import reconcile as st
from ...metrics import METRICS
from ..base import Host, check_inline_dataset
from . import builders as tb
from . import client as T
from . import status as TS


def base_url(config: Any) -> Optional[str]:
    """The Together endpoint: the operator setting, else $TOGETHER_BASE_URL, else the SDK's."""
    return getattr(config, "together_base_url", None) or os.environ.get("TOGETHER_BASE_URL") or None


class SecretMissing(Exception):
    pass


async def read_api_key(kc: kube.KubeClient, namespace: str, spec: FineTuneJobSpec) -> str:
    """The API key from the Secret (SecretMissing says which one when it is not there)."""
    if spec.together is None:
        raise SecretMissing("spec.together.apiKeySecretRef is not set")
    ref = spec.together.api_key_secret_ref
    secret = await kc.get("v1", "Secret", ref.name, namespace)
    if secret is None:
        raise SecretMissing(f"Secret {ref.name} not found")
    raw = (secret.get("data") or {}).get(ref.key)
    key = ""
    if raw:
        try:
            key = base64.b64decode(raw).decode("utf-8").strip()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise SecretMissing(f"Secret {ref.name}: key {ref.key} is not valid base64 text") from None
    elif (secret.get("stringData") or {}).get(ref.key):
        key = str(secret["stringData"][ref.key]).strip()
    del secret
    if not key:
        raise SecretMissing(f"Secret {ref.name} has no key {ref.key}")
    return key


def _client(host: Host, key: str) -> T.TogetherClient:
    cfg = host.config
    return T.TogetherClient(
        key, base_url(cfg), on_request=METRICS.together.record,
        max_retries=cfg.together_max_retries, timeout=cfg.together_timeout,
    )


async def with_client(host: Host, key: str, fn: Callable[[T.TogetherClient], Any]) -> Any:
    """``fn(client)`` in a worker thread, with a client made (and closed) there."""

    def work() -> Any:
        with _client(host, key) as client:
            return fn(client)

    return await asyncio.to_thread(work)


# ---------------------------------------------------------------------------------- observe


async def observe(host: Host, kc: kube.KubeClient, body: dict[str, Any], spec: FineTuneJobSpec) -> st.Observed:
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    obs = st.Observed()
    obs.config_map = await kc.get("v1", "ConfigMap", b.config_map_name(name), ns)
    obs.upload_job = await kc.get("batch/v1", "Job", tb.upload_job_name(name), ns)
    obs.download_job = await kc.get("batch/v1", "Job", tb.download_job_name(name), ns)
    if obs.upload_job or obs.download_job:
        pods = await kc.list("v1", "Pod", ns, label_selector={b.OWNER_LABEL: name})
        obs.upload_pods = st.pods_of(obs.upload_job, pods)
        obs.download_pods = st.pods_of(obs.download_job, pods)
    if st.is_settled(body):
        return obs
    tg = TS.together_of(body.get("status") or {})
    if not tg.get("jobId"):
        contents: dict[str, dict[str, Any]] = {}
        for kind, dep, key in TS.together_dependencies(spec):
            obj = await kc.get("v1", kind, dep, ns)
            if obj is None:
                obs.missing.append(f"{kind} {dep}")
                continue
            if key is not None:
                data = obj.get("data") or {}
                if key not in data and key not in (obj.get("binaryData") or {}) and key not in (
                    obj.get("stringData") or {}
                ):
                    obs.missing.append(f"{kind} {dep} (key {key})")
            if kind == "ConfigMap":
                contents[dep] = obj.get("data") or {}
            del obj  # Secrets: only their existence matters here
        if not obs.missing and not st.is_validated(body):
            for split, (cm, key) in TS.inline_sources(spec).items():
                text = (contents.get(cm) or {}).get(key, "")
                obs.inline_datasets[split] = await check_inline_dataset(
                    text, spec.dataset.format.value, f"configMap {cm}/{key}"
                )
    files = TS.estimate_files(body, obs)
    if files is not None and not obs.missing and TS.wait_seconds(body.get("status") or {}, host.now()) <= 0:
        await estimate(host, kc, body, spec, obs, files)
    if TS.needs_poll(body) and TS.poll_due(body, host.now()):
        await poll(host, kc, body, spec, obs)
    return obs


async def estimate(
    host: Host, kc: kube.KubeClient, body: dict[str, Any], spec: FineTuneJobSpec, obs: st.Observed,
    files: tuple[str, Optional[str], Optional[str]],
) -> None:
    """Together's price estimate of the job about to be created into ``obs`` (or why not)."""
    training_file, validation_file, fmt = files
    try:
        key = await read_api_key(kc, body["metadata"]["namespace"], spec)
    except SecretMissing as e:
        obs.together_estimate_error = {"reason": st.DEPENDENCY_MISSING, "message": str(e)}
        return
    params = T.estimate_params(T.create_params(
        spec, training_file=training_file, validation_file=validation_file, suffix="", dataset_format=fmt,
    ))

    def ask(client: T.TogetherClient) -> dict[str, Any]:
        return client.estimate_price(params)

    try:
        obs.together_estimate = await with_client(host, key, ask)
    except T.TogetherBackendError as e:
        obs.together_estimate_error = {"reason": e.reason, "message": e.message, "statusCode": e.status_code,
                                       "retryAfter": e.retry_after}
    finally:
        del key


async def poll(host: Host, kc: kube.KubeClient, body: dict[str, Any], spec: FineTuneJobSpec, obs: st.Observed) -> None:
    """The Together job and its new events into ``obs`` (or what went wrong)."""
    ns = body["metadata"]["namespace"]
    tg = TS.together_of(body.get("status") or {})
    job_id, cursor = tg["jobId"], int(tg.get("eventCursor") or 0)
    try:
        key = await read_api_key(kc, ns, spec)
    except SecretMissing as e:
        obs.together_error = {"reason": st.DEPENDENCY_MISSING,
                              "message": f"{e}: cannot follow Together job {job_id}"}
        return

    def fetch(client: T.TogetherClient) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
        ft = client.retrieve(job_id)
        events, new_cursor = client.list_events(job_id, cursor)
        return ft, events, new_cursor

    try:
        ft, events, new_cursor = await with_client(host, key, fetch)
    except T.TogetherBackendError as e:
        obs.together_error = {"reason": e.reason, "message": e.message, "statusCode": e.status_code,
                              "retryAfter": e.retry_after}
        return
    finally:
        del key
    obs.together_job = ft
    obs.together_events = events
    obs.together_event_cursor = new_cursor


# ---------------------------------------------------------------------------------- actions


async def ensure_finalizer(host: Host, kc: kube.KubeClient, body: dict[str, Any]) -> None:
    """Our finalizer before anything is created at Together (kopf keeps it while
    :func:`status.needs_finalizer` holds, and removes it after the on-delete handler)."""
    meta = body.get("metadata") or {}
    finalizer = f"{host.prefix}/finalizer"
    current = list(meta.get("finalizers") or [])
    if finalizer in current:
        return
    await kc.patch(host.api_version, host.kind, meta["name"], meta["namespace"],
                   {"metadata": {"finalizers": current + [finalizer]}})
    meta["finalizers"] = current + [finalizer]


async def run_actions(
    host: Host, kc: kube.KubeClient, body: dict[str, Any], decision: st.Decision, logger: Any
) -> None:
    """The Together calls of ``decision`` (its status is already written); every outcome goes
    through a pure function of backends/together/status.py and is written at once."""
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    body = {**body, "status": decision.status}
    spec = st.spec_of(body)
    try:
        key: Optional[str] = await read_api_key(kc, ns, spec)
        missing = ""
    except SecretMissing as e:
        key, missing = None, str(e)
    try:
        for action in decision.calls:
            op = action["op"]
            now = host.now()
            result: Optional[st.Decision] = None
            if key is None:
                result = TS.call_failed(body, op, st.DEPENDENCY_MISSING,
                                        f"{missing}: cannot {op} the Together job", user_error=False, now=now)
            elif op == "create":
                await ensure_finalizer(host, kc, body)
                params = action["params"]

                def create(c: T.TogetherClient, params: dict[str, Any] = params) -> tuple[dict[str, Any], bool]:
                    return c.create_or_adopt(params)

                try:
                    job, adopted = await with_client(host, key, create)
                except T.TogetherBackendError as e:
                    logger.warning(f"Together create for {ns}/{name} failed: {e.reason}: {e.message}")
                    result = TS.call_failed(body, op, e.reason, e.message, user_error=e.user_error, now=now,
                                            retry_after=e.retry_after)
                else:
                    result = TS.job_created(body, job, adopted, now=host.now())
            elif op == "cancel":
                jid = action["jobId"]

                def cancel(c: T.TogetherClient, jid: str = jid) -> dict[str, Any]:
                    return c.cancel(jid)

                try:
                    await with_client(host, key, cancel)
                except T.TogetherBackendError as e:
                    if action.get("stale") and e.status_code == 404:
                        result = TS.stale_cancelled(body, jid, now=now)
                    else:
                        logger.warning(f"Together cancel of {jid} failed: {e.reason}: {e.message}")
                        result = TS.call_failed(body, op, e.reason, e.message, user_error=False, now=now,
                                                retry_after=e.retry_after)
                else:
                    logger.info(f"Together job {jid} cancelled")
                    if action.get("stale"):
                        result = TS.stale_cancelled(body, jid, now=now)
            if result is not None:
                await host.apply(kc, body, result)
                for ev in result.events:
                    logger.info(f"{ev['reason']}: {ev['message']}")
                body = {**body, "status": result.status}
                if result.phase in st.TERMINAL or (op == "create" and result.status.get("reason") != st.TOGETHER_JOB_CREATED):
                    break
    finally:
        key = None


# ---------------------------------------------------------------------------------- handlers


def _needs_finalizer(body: kopf.Body, **_: Any) -> bool:
    return TS.needs_finalizer(dict(body))


def _is_active(body: kopf.Body, **_: Any) -> bool:
    return TS.needs_poll(dict(body))


async def on_delete(
    host: Host, body: kopf.Body, namespace: str, name: str, logger: kopf.Logger, retry: int,
) -> None:
    """Cancel what still runs at Together before the FineTuneJob goes (nothing left billing).
    Under the object's lock, so a create in flight has recorded its job id first."""
    async with host.lock(namespace, name):
        fresh = await kube.client().get(host.api_version, host.kind, name, namespace)
    data = fresh if fresh is not None else dict(body)
    ids, suffix = TS.jobs_to_cancel(data)
    if not ids and not suffix:
        return
    limit = host.config.together_delete_retries
    delay = host.config.retry_interval

    def give_up(why: str) -> None:
        msg = f"could not cancel Together job(s) {', '.join(ids) or 'with suffix ' + str(suffix)}: {why}"
        logger.warning(msg)
        kopf.event(body, type="Warning", reason="TogetherCancelFailed", message=msg)

    try:
        spec = st.spec_of(data)
        key = await read_api_key(kube.client(), namespace, spec)
    except SecretMissing as e:
        if retry < limit:
            raise kopf.TemporaryError(f"{e}: cannot cancel at Together yet", delay=delay) from None
        give_up(str(e))
        return

    def cancel_all(client: T.TogetherClient) -> list[str]:
        todo = list(ids)
        if suffix:
            job = client.find(suffix)
            if job is not None and job.get("status") not in T.TERMINAL_STATES:
                todo.append(str(job["id"]))
        done = []
        for jid in dict.fromkeys(todo):
            try:
                client.cancel(jid)
            except T.TogetherUserError as e:
                if e.status_code == 404:
                    continue
                raise
            done.append(jid)
        return done

    try:
        cancelled = await with_client(host, key, cancel_all)
    except T.TogetherBackendError as e:
        if retry < limit:
            raise kopf.TemporaryError(f"cancel at Together: {e.message}", delay=delay) from None
        give_up(e.message)
        return
    finally:
        key = ""
    for jid in cancelled:
        msg = f"Together job {jid} cancelled: the FineTuneJob is being deleted"
        logger.info(msg)
        kopf.event(body, type="Normal", reason="TogetherJobCancelled", message=msg)


def register(host: Host, reg: kopf.OperatorRegistry, ftj: tuple[str, str, str]) -> None:
    """kopf handlers of backend together: the poll timer and the cancel on delete."""

    async def monitor_timer(namespace: str, name: str, logger: kopf.Logger, **_: Any) -> None:
        """Poll Together (through a reconcile: status, progress, events, download when completed)."""
        await host.reconcile(namespace, name, logger)

    async def cancel_on_delete(
        body: kopf.Body, namespace: str, name: str, logger: kopf.Logger, retry: int, **_: Any
    ) -> None:
        await on_delete(host, body, namespace, name, logger, retry)

    # kopf's handler protocols type `namespace` as `str | None` (None only for cluster-scoped
    # resources); FineTuneJobs are namespaced, so these handlers take a str.
    kopf.on.delete(*ftj, registry=reg, id="together-cancel", when=_needs_finalizer)(cancel_on_delete)  # type: ignore[arg-type]
    kopf.timer(
        *ftj, registry=reg, id="together-monitor", interval=host.config.together_poll_interval,
        when=_is_active,
    )(monitor_timer)  # type: ignore[arg-type]
