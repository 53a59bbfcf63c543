"""A local fake of the Together fine-tuning API, for driving the real ``together`` SDK (3.1.1).

Shapes follow ``shared/reference/together-api.md``. Start one per test::

    with FakeTogether(api_key="tk-test") as fake:        # 127.0.0.1, random port, own thread
        client = together.Together(api_key="tk-test", base_url=fake.url)

Endpoints (all under ``/v1`` except the upload target):

- ``POST /v1/files`` (multipart: purpose, file_name, file_type, checksum) -> 302 with ``Location``
  (``/upload/{id}`` on this server) and ``X-Together-File-Id``; ``PUT /upload/{id}`` stores the
  bytes; ``POST /v1/files/{id}/preprocess`` -> FileResponse with ``validation_report`` (valid unless
  a line is not a JSON object, or ``fake.file_invalid`` is set); ``GET /v1/files[/{id}]``.
- ``GET /v1/fine-tunes/models/limits``, ``POST /v1/fine-tunes/estimate-price`` (``fake.estimate_usd``,
  ``fake.estimate_unavailable``; ``fake.running_price_nanodollars``: ``total_price`` while running).
- ``POST /v1/fine-tunes`` (create; the body is kept in ``fake.create_bodies``), ``GET
  /v1/fine-tunes`` (list, truncated jobs with ``suffix``), ``GET /v1/fine-tunes/{id}`` (retrieve:
  each call advances the job one state along ``fake.progression``, adding events), ``GET
  .../events``, ``GET .../checkpoints``, ``POST .../cancel``.
- ``GET /v1/finetune/download?ft_id=..&checkpoint=..``: ``fake.archive`` (bytes) with
  ``fake.archive_content_type``; honours ``Range: bytes=N-`` (206 + Content-Range).

Faults, each used ``times`` times (then gone), matched on method + path regex::

    fake.fault("GET", r"/v1/fine-tunes/ft-", status=429, headers={"retry-after": "0"})
    fake.fault("POST", r"^/v1/fine-tunes$", drop=True)           # close before handling
    fake.fault("POST", r"^/v1/fine-tunes$", drop_after=True)     # handle (job created), then close
    fake.fault("GET", r"/download", truncate=1000)                # send 1000 bytes, then close
    fake.fault("GET", r"/v1/fine-tunes$", delay=3.0)              # slow answer
    fake.fault("POST", r"^/v1/fine-tunes$", reply=b"")            # handle (job created), then answer
    fake.fault("GET", r"/v1/fine-tunes/ft-", reply=b"<html>", reply_type="text/html")  # 200 + these bytes

A job ends as ``fake.outcome`` ("completed", "error" or "user_error" with ``fake.outcome_message``).
Every request is recorded in ``fake.requests`` (method, path, query, headers, body bytes) — e.g.
to assert the Authorization header carries the key only to API paths, never to the upload URL.
Responses never echo the key.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import re
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from aiohttp import web

logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)  # dropped connections are on purpose

TOTAL_STEPS = 30
_RequestKey = getattr(web, "RequestKey", None)
BODY: Any = _RequestKey("body", bytes) if _RequestKey else "body"
TRUNCATE: Any = _RequestKey("truncate", object) if _RequestKey else "truncate"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Fault:
    method: str
    path: str
    times: int = 1
    status: Optional[int] = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False
    drop_after: bool = False
    delay: float = 0.0
    truncate: Optional[int] = None
    reply: Optional[bytes] = None
    reply_type: str = "application/json"
    used: int = 0


DEFAULT_LIMITS = {
    "model_name": None,
    "default_gradient_accumulation_steps": 1,
    "lora_training": {
        "default_rank": 8, "max_rank": 64, "min_batch_size": 8, "max_batch_size": 64,
        "max_batch_size_dpo": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    },
    "full_training": {"min_batch_size": 8, "max_batch_size": 32, "max_batch_size_dpo": 16},
    "max_learning_rate": 1.0, "min_learning_rate": 1e-8, "max_num_checkpoints": 10,
    "max_num_epochs": 20, "max_num_evals": 10, "max_seq_length_sft": 8192,
    "max_seq_length_dpo": 8192, "min_max_seq_length": 512, "merge_output_lora": False,
    "supports_full_training": True, "supports_reasoning": False, "supports_tools": False,
    "supports_vision": False,
}


class FakeTogether:
    def __init__(self, api_key: str = "tk-fake-key", *, archive: bytes = b"",
                 archive_content_type: str = "application/x-tar"):
        self.api_key = api_key
        self.archive = archive
        self.archive_content_type = archive_content_type
        self.progression = ["pending", "queued", "running", "running", "uploading", "completed"]
        self.outcome = "completed"
        self.outcome_message = "Invalid dataset: the training file has rows longer than max_seq_length"
        self.file_invalid: Optional[str] = None
        self.limits = dict(DEFAULT_LIMITS)
        self.price_nanodollars = 1_234_567_890
        # What estimate-price answers (USD; None: the price above), or why it cannot estimate.
        self.estimate_usd: Optional[float] = None
        self.estimate_unavailable: Optional[str] = None
        # total_price once training runs (Together prices the job after tokenizing it); None: 0
        # until the job completes, then price_nanodollars.
        self.running_price_nanodollars: Optional[int] = None
        self.files: dict[str, dict[str, Any]] = {}
        self.uploads: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.create_bodies: list[dict[str, Any]] = []
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._runner: Optional[web.AppRunner] = None
        self._thread: Optional[threading.Thread] = None
        self.port = 0

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "FakeTogether":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            app = web.Application(middlewares=[self._middleware], client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", self._dispatch)
            runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._runner = runner
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-together", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake Together server did not start")

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    # ---------------------------------------------------------------- test helpers

    def fault(self, method: str, path: str, *, times: int = 1, **kw: Any) -> Fault:
        f = Fault(method=method.upper(), path=path, times=times, **kw)
        with self._lock:
            self.faults.append(f)
        return f

    def calls(self, method: str, path_regex: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method.upper() and re.search(path_regex, r.path)]

    def add_job(self, **fields: Any) -> dict[str, Any]:
        """Put a job straight into the store (e.g. one created by an earlier operator run)."""
        job = self._new_job(fields)
        return job

    # ---------------------------------------------------------------- plumbing

    def _take_fault(self, method: str, path: str) -> Optional[Fault]:
        with self._lock:
            for f in self.faults:
                if f.used < f.times and f.method == method and re.search(f.path, path):
                    f.used += 1
                    return f
        return None

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.read()
        rec = Recorded(request.method, request.path, dict(request.query), dict(request.headers), body)
        with self._lock:
            self.requests.append(rec)
        request[BODY] = body
        fault = self._take_fault(request.method, request.path)
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.drop:
                return self._drop(request)
            if fault.status is not None:
                payload = fault.body if fault.body is not None else {
                    "error": {"message": f"injected {fault.status}", "type": "fake"}}
                return web.json_response(payload, status=fault.status, headers=fault.headers)
            request[TRUNCATE] = fault.truncate
        response = await handler(request)
        if fault is not None and fault.drop_after:
            return self._drop(request)
        if fault is not None and fault.reply is not None:
            return web.Response(body=fault.reply, status=200, headers={"Content-Type": fault.reply_type})
        return response

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            transport.abort()
        raise ConnectionResetError("fake: connection dropped")

    def _auth_ok(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path, m = request.path, request.method
        if path.startswith("/upload/") and m == "PUT":
            return self._put_upload(request, path.split("/")[-1])
        if not path.startswith("/v1/"):
            return web.json_response({"error": {"message": "not found"}}, status=404)
        if not self._auth_ok(request):
            return web.json_response({"error": {"message": "Invalid API key provided", "type": "invalid_api_key"}},
                                     status=401)
        routes = [
            ("POST", r"^/v1/files$", self._files_create),
            ("GET", r"^/v1/files$", self._files_list),
            ("POST", r"^/v1/files/([^/]+)/preprocess$", self._files_preprocess),
            ("GET", r"^/v1/files/([^/]+)$", self._files_get),
            ("GET", r"^/v1/fine-tunes/models/limits$", self._limits),
            ("POST", r"^/v1/fine-tunes/estimate-price$", self._estimate),
            ("POST", r"^/v1/fine-tunes$", self._ft_create),
            ("GET", r"^/v1/fine-tunes$", self._ft_list),
            ("GET", r"^/v1/fine-tunes/([^/]+)/events$", self._ft_events),
            ("GET", r"^/v1/fine-tunes/([^/]+)/checkpoints$", self._ft_checkpoints),
            ("POST", r"^/v1/fine-tunes/([^/]+)/cancel$", self._ft_cancel),
            ("GET", r"^/v1/fine-tunes/([^/]+)$", self._ft_get),
            ("GET", r"^/v1/finetune/download$", self._download),
        ]
        for method, regex, fn in routes:
            mm = re.match(regex, path)
            if mm and method == m:
                return await fn(request, *mm.groups())
        return web.json_response({"error": {"message": f"no route {m} {path}"}}, status=404)

    # ---------------------------------------------------------------- files

    async def _files_create(self, request: web.Request) -> web.StreamResponse:
        form = await self._form(request)
        fid = "file-" + uuid.uuid4().hex[:16]
        self.files[fid] = {
            "id": fid, "object": "file", "bytes": 0, "created_at": int(dt.datetime.now().timestamp()),
            "filename": form.get("file_name", ""), "FileType": form.get("file_type", "jsonl"),
            "purpose": form.get("purpose", "fine-tune"), "processing_status": "PENDING",
            "checksum": form.get("checksum"),
        }
        return web.Response(status=302, headers={"Location": f"{self.url}/upload/{fid}",
                                                 "X-Together-File-Id": fid})

    async def _form(self, request: web.Request) -> dict[str, str]:
        body: bytes = request[BODY]
        ctype = request.headers.get("Content-Type", "")
        out: dict[str, str] = {}
        mb = re.search(r"boundary=([^;]+)", ctype)
        if mb:
            boundary = mb.group(1).strip('"').encode()
            for part in body.split(b"--" + boundary):
                head, _, value = part.partition(b"\r\n\r\n")
                mn = re.search(rb'name="([^"]+)"', head)
                if mn:
                    out[mn.group(1).decode()] = value.rstrip(b"\r\n").decode("utf-8", "replace")
        return out

    def _put_upload(self, request: web.Request, fid: str) -> web.StreamResponse:
        if fid not in self.files:
            return web.Response(status=404)
        data: bytes = request[BODY]
        self.uploads[fid] = data
        self.files[fid]["bytes"] = len(data)
        return web.Response(status=200)

    async def _files_preprocess(self, request: web.Request, fid: str) -> web.StreamResponse:
        f = self.files.get(fid)
        if f is None or fid not in self.uploads:
            return web.json_response({"error": {"message": "file not found"}}, status=404)
        data = self.uploads[fid]
        lines = [ln for ln in data.decode("utf-8", "replace").split("\n") if ln.strip()]
        error = self.file_invalid
        fmt = None
        for i, ln in enumerate(lines, 1):
            try:
                row = json.loads(ln)
            except ValueError:
                error = error or f"line {i}: invalid JSON"
                break
            if not isinstance(row, dict):
                error = error or f"line {i}: not an object"
                break
            fmt = fmt or ("CONVERSATION" if "messages" in row else "PREFERENCE" if "preferred_output" in row
                          else "INSTRUCTION" if "prompt" in row else "GENERAL")
        report: dict[str, Any] = {"valid": error is None, "dataset_format": fmt, "nlines": len(lines), "file_id": fid}
        if error:
            report.update(error=error, error_type="INVALID_FORMAT")
        f["processing_status"] = "COMPLETED" if error is None else "INVALID_FORMAT"
        f["validation_report"] = report
        return web.json_response(f)

    async def _files_get(self, request: web.Request, fid: str) -> web.StreamResponse:
        if fid not in self.files:
            return web.json_response({"error": {"message": "file not found"}}, status=404)
        return web.json_response(self.files[fid])

    async def _files_list(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"data": list(self.files.values())})

    # ---------------------------------------------------------------- fine-tunes

    async def _limits(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({**self.limits, "model_name": request.query.get("model_name")})

    async def _estimate(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(request[BODY] or b"{}")
        if body.get("training_file") not in self.files:
            return web.json_response({"estimation_available": False, "unavailable_reason": "train_file_not_validated"})
        if self.estimate_unavailable:
            return web.json_response({"estimation_available": False, "unavailable_reason": self.estimate_unavailable})
        price = self.estimate_usd if self.estimate_usd is not None else self.price_nanodollars / 1e9
        return web.json_response({
            "estimation_available": True, "allowed_to_proceed": True,
            "estimated_total_price": price, "estimated_train_token_count": 123456 * int(body.get("n_epochs") or 1),
            "estimated_eval_token_count": 0, "user_limit": 1000.0,
        })

    def _new_job(self, body: dict[str, Any]) -> dict[str, Any]:
        jid = "ft-" + str(uuid.uuid4())
        now = _now()
        model = body.get("model") or str(body.get("from_checkpoint") or "base").split(":")[0]
        suffix = body.get("suffix")
        out_name = f"tuneop-test/{model.rsplit('/', 1)[-1]}" + (f"-{suffix}" if suffix else "") + f"-{uuid.uuid4().hex[:8]}"
        job = {
            "id": jid, "status": "pending", "user_id": "user-1", "created_at": now, "updated_at": now,
            "model": model, "model_output_name": out_name, "suffix": suffix,
            "training_file": body.get("training_file"), "validation_file": body.get("validation_file"),
            "n_epochs": body.get("n_epochs"), "n_checkpoints": body.get("n_checkpoints"),
            "n_evals": body.get("n_evals"), "batch_size": body.get("batch_size"),
            "learning_rate": body.get("learning_rate"), "lr_scheduler": body.get("lr_scheduler"),
            "warmup_ratio": body.get("warmup_ratio"), "training_type": body.get("training_type"),
            "training_method": body.get("training_method"), "random_seed": body.get("random_seed"),
            "events": [], "token_count": 0, "param_count": 8_000_000, "total_price": 0,
            "epochs_completed": 0, "queue_depth": 0,
            "progress": {"estimate_available": False, "seconds_remaining": 0},
            "_step": 0,
        }
        self._event(job, "job_pending", "Fine tune request created")
        with self._lock:
            self.jobs[jid] = job
        return job

    @staticmethod
    def _event(job: dict[str, Any], etype: str, message: str, level: str = "info", **extra: Any) -> None:
        job["events"].append({"object": "fine-tune-event", "created_at": _now(), "message": message,
                              "type": etype, "level": level, **extra})

    def _public(self, job: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in job.items() if not k.startswith("_")}

    def _truncated(self, job: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in self._public(job).items() if k not in ("events",)}

    def _advance(self, job: dict[str, Any]) -> None:
        if job["status"] in ("completed", "cancelled", "error", "user_error"):
            return
        if job["status"] == "cancel_requested":
            job["status"] = "cancelled"
            self._event(job, "job_stopped", "Job cancelled by the user", level="warning")
            return
        idx = job.get("_idx", 0) + 1
        job["_idx"] = idx
        nxt = self.progression[min(idx, len(self.progression) - 1)]
        if self.outcome != "completed" and nxt in ("running", "uploading", "completed") and job["_step"] > 0:
            job["status"] = self.outcome
            self._event(job, "job_error", self.outcome_message, level="error")
            job["updated_at"] = _now()
            return
        job["status"] = nxt
        job["updated_at"] = _now()
        if nxt == "queued":
            job["queue_depth"] = 2
            self._event(job, "job_start", "Job queued")
        elif nxt == "running":
            job["_step"] = min(TOTAL_STEPS, job["_step"] + TOTAL_STEPS // 2)
            if job["_step"] == TOTAL_STEPS // 2:
                self._event(job, "training_start", "Training started")
            job["token_count"] = 1000 * job["_step"]
            if self.running_price_nanodollars is not None:
                job["total_price"] = self.running_price_nanodollars
            job["epochs_completed"] = job["_step"] * int(job.get("n_epochs") or 1) // TOTAL_STEPS
            job["progress"] = {"estimate_available": True, "seconds_remaining": 60 * (TOTAL_STEPS - job["_step"]) // 10}
            self._event(job, "checkpoint_save", "Checkpoint saved", step=job["_step"], total_steps=TOTAL_STEPS,
                        checkpoint_path=f"s3://fake/{job['id']}/checkpoint-{job['_step']}")
        elif nxt == "uploading":
            self._event(job, "training_complete", "Training completed")
            self._event(job, "model_uploading", "Uploading model")
        elif nxt == "completed":
            job["_step"] = TOTAL_STEPS
            job["token_count"] = 1000 * TOTAL_STEPS
            job["epochs_completed"] = int(job.get("n_epochs") or 1)
            job["total_price"] = self.price_nanodollars
            job["progress"] = {"estimate_available": False, "seconds_remaining": 0}
            self._event(job, "model_upload_complete", "Model uploaded")
            self._event(job, "job_complete", "Job finished")

    async def _ft_create(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(request[BODY] or b"{}")
        self.create_bodies.append(body)
        if body.get("training_file") not in self.files:
            return web.json_response({"error": {"message": "training_file not found"}}, status=400)
        job = self._new_job(body)
        return web.json_response(self._public(job))

    async def _ft_list(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"data": [self._truncated(j) for j in self.jobs.values()]})

    def _job(self, jid: str) -> Optional[dict[str, Any]]:
        return self.jobs.get(jid)

    async def _ft_get(self, request: web.Request, jid: str) -> web.StreamResponse:
        job = self._job(jid)
        if job is None:
            return web.json_response({"error": {"message": "job not found"}}, status=404)
        self._advance(job)
        return web.json_response(self._public(job))

    async def _ft_events(self, request: web.Request, jid: str) -> web.StreamResponse:
        job = self._job(jid)
        if job is None:
            return web.json_response({"error": {"message": "job not found"}}, status=404)
        return web.json_response({"data": job["events"]})

    async def _ft_checkpoints(self, request: web.Request, jid: str) -> web.StreamResponse:
        job = self._job(jid)
        if job is None:
            return web.json_response({"error": {"message": "job not found"}}, status=404)
        data = [{"checkpoint_type": "Intermediate", "created_at": e["created_at"], "path": e.get("checkpoint_path"),
                 "step": e["step"], "checkpoint": "adapter"} for e in job["events"] if e["type"] == "checkpoint_save"]
        return web.json_response({"data": data})

    async def _ft_cancel(self, request: web.Request, jid: str) -> web.StreamResponse:
        job = self._job(jid)
        if job is None:
            return web.json_response({"error": {"message": "job not found"}}, status=404)
        if job["status"] not in ("completed", "cancelled", "error", "user_error"):
            job["status"] = "cancel_requested"
            self._event(job, "cancel_requested", "Cancel requested", level="warning")
        return web.json_response(self._truncated(job))

    async def _download(self, request: web.Request) -> web.StreamResponse:
        jid = request.query.get("ft_id", "")
        job = self._job(jid)
        if job is None:
            return web.json_response({"error": {"message": "job not found"}}, status=404)
        if job["status"] != "completed":
            return web.json_response({"error": {"message": "job is not completed"}}, status=400)
        data = self.archive
        total = len(data)
        start, status = 0, 200
        headers = {"Content-Type": self.archive_content_type, "Accept-Ranges": "bytes",
                   "Content-Disposition": f'attachment; filename="{jid}.tar"'}
        rng = request.headers.get("Range")
        if rng:
            mm = re.match(r"bytes=(\d+)-(\d*)$", rng.strip())
            if not mm or int(mm.group(1)) >= total:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{total}"})
            start = int(mm.group(1))
            end = int(mm.group(2)) if mm.group(2) else total - 1
            end = min(end, total - 1)
            data = data[start:end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        truncate = request.get(TRUNCATE)
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(data)
        await resp.prepare(request)
        if truncate is not None:
            await resp.write(data[:truncate])
            await asyncio.sleep(0.05)
            return self._drop(request)
        await resp.write(data)
        await resp.write_eof()
        return resp


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
