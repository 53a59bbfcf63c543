"""Object storage: ``s3://bucket/key`` on any S3-compatible endpoint, for the code that runs in pods
(the trainer and validator, the adapter fetcher) and ``tuneop run``. Standard library only: requests
are signed with AWS Signature Version 4 here (no boto3: botocore needs python-dateutil < 3, which the
Kubernetes client 37 refuses, and the pods need four calls of it).

Settings come from the environment, under the names the AWS tools use, so that what works with
``aws s3`` works here:

- ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``): the credentials. In pods
  they come from the Secret that ``spec.storage.s3.credentialsSecretRef`` names (env ``secretKeyRef``).
  None set: requests go unsigned (public buckets).
- ``AWS_ENDPOINT_URL_S3`` (else ``AWS_ENDPOINT_URL``): the endpoint of an S3-compatible server
  (MinIO, Ceph, R2, ...), addressed path-style (``<endpoint>/<bucket>/<key>``). Unset: AWS itself,
  ``https://<bucket>.s3.<region>.amazonaws.com``.
- ``AWS_REGION`` (else ``AWS_DEFAULT_REGION``, else ``us-east-1``): the region the signature names.

An adapter in S3 is a "directory": the files its ``tuneop-manifest.json`` lists, under one prefix.
:func:`upload_adapter` removes the old manifest first, uploads the files, and the manifest LAST: it is
the commit marker. A prefix without a manifest is an upload that did not finish, and
:func:`download_adapter` refuses it; it checks every file against the manifest's sha256 and
places the directory only once all of them match.

Errors are :class:`S3Error`, whose message names the ``s3://`` URI and S3's error code
(``NoSuchBucket``, ``NoSuchKey``, ``AccessDenied``, ``InvalidAccessKeyId``, ``SignatureDoesNotMatch``).
Secrets never appear in one.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import tempfile
import time
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import IO, Any, Mapping, Optional, Union

from .files import atomic_file

SCHEME = "s3://"
MANIFEST = "tuneop-manifest.json"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
CHUNK = 1 << 20
# One PUT takes at most 5 GiB; larger files go in parts (S3: 5 MiB to 5 GiB each, at most 10,000).
MULTIPART_THRESHOLD = 256 << 20
PART_SIZE = 128 << 20
RETRIES = 3
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# S3's codes that no retry changes (the bucket, the key, the credentials, the request are wrong)
CLIENT_CODES = {"NoSuchBucket", "NoSuchKey", "NotFound", "AccessDenied", "InvalidAccessKeyId",
                "SignatureDoesNotMatch", "InvalidBucketName", "Forbidden", "InvalidURI", "AllAccessDisabled"}


class S3Error(Exception):
    """A failed S3 request or a refused object. ``code``: S3's error code (or ours: Incomplete,
    ChecksumMismatch, InvalidUri, Unreachable); ``status``: the HTTP status (0: no answer)."""

    def __init__(self, uri: str, code: str, message: str, status: int = 0):
        self.uri, self.code, self.status = uri, code, status
        super().__init__(f"{uri}: {code}" + (f" (HTTP {status})" if status else "") + (f": {message}" if message else ""))

    @property
    def client_error(self) -> bool:
        """The request itself is wrong (missing bucket or key, bad credentials, refused): retrying
        changes nothing."""
        return self.code in CLIENT_CODES or self.code in ("Incomplete", "ChecksumMismatch", "InvalidUri",
                                                          "InvalidEndpoint") or (
            400 <= self.status < 500 and self.status not in (408, 429))


def is_s3(uri: Optional[str]) -> bool:
    return bool(uri) and str(uri).lower().startswith(SCHEME)


def parse_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key); the key may be empty or end with '/' (a prefix)."""
    if not is_s3(uri):
        raise S3Error(uri, "InvalidUri", "expected s3://<bucket>/<key>")
    bucket, _, key = uri[len(SCHEME):].partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise S3Error(uri, "InvalidUri", f"{bucket!r} is not a valid bucket name")
    if any(part in (".", "..") for part in key.split("/")):
        raise S3Error(uri, "InvalidUri", "the key must not have '.' or '..' segments")
    return bucket, key


def join(prefix: str, name: str) -> str:
    return prefix.rstrip("/") + "/" + name


@dataclass(frozen=True)
class Settings:
    endpoint: Optional[str] = None  # None: AWS (virtual-hosted style)
    region: str = "us-east-1"
    access_key_id: Optional[str] = None
    secret_access_key: Optional[str] = None
    session_token: Optional[str] = None

    def __repr__(self) -> str:  # never the secret
        return f"Settings(endpoint={self.endpoint!r}, region={self.region!r}, signed={self.access_key_id is not None})"

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "Settings":
        env = os.environ if env is None else env
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        key, secret = env.get("AWS_ACCESS_KEY_ID") or None, env.get("AWS_SECRET_ACCESS_KEY") or None
        return cls(endpoint=endpoint.rstrip("/") if endpoint else None, region=region,
                   access_key_id=key if key and secret else None, secret_access_key=secret if key and secret else None,
                   session_token=env.get("AWS_SESSION_TOKEN") or None)


# ---------------------------------------------------------------- Signature Version 4 (pure)

def _quote(s: str, safe: str = "") -> str:
    return urllib.parse.quote(s, safe="-_.~" + safe)


def canonical_query(query: Mapping[str, str]) -> str:
    return "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items()))


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sign(method: str, host: str, path: str, query: Mapping[str, str], headers: Mapping[str, str],
         payload_sha256: str, settings: Settings, now: _dt.datetime) -> dict[str, str]:
    """The headers of a request signed with SigV4 (``path`` already URI-encoded): ``headers`` plus
    host, x-amz-date, x-amz-content-sha256, the session token and Authorization."""
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    out = {**headers, "host": host, "x-amz-date": amz_date, "x-amz-content-sha256": payload_sha256}
    if settings.session_token:
        out["x-amz-security-token"] = settings.session_token
    if not (settings.access_key_id and settings.secret_access_key):
        return out
    names = sorted(k.lower() for k in out)
    lowered = {k.lower(): " ".join(str(v).split()) for k, v in out.items()}
    canonical = "\n".join([
        method, path, canonical_query(query),
        "".join(f"{n}:{lowered[n]}\n" for n in names), ";".join(names), payload_sha256,
    ])
    scope = f"{amz_date[:8]}/{settings.region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + settings.secret_access_key).encode(), amz_date[:8]),
                            settings.region), "s3"), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={settings.access_key_id}/{scope}, "
                            f"SignedHeaders={';'.join(names)}, Signature={signature}")
    return out


def address(settings: Settings, bucket: str, key: str) -> tuple[str, str, str]:
    """(scheme, host[:port], encoded path) of an object: path-style on a given endpoint, else AWS's
    virtual-hosted style."""
    if settings.endpoint:
        p = urllib.parse.urlsplit(settings.endpoint)
        if p.scheme not in ("http", "https") or not p.netloc:
            raise S3Error(f"s3://{bucket}/{key}", "InvalidEndpoint",
                          f"endpoint {settings.endpoint!r} is not http(s)://host[:port]")
        base = p.path.rstrip("/")
        return p.scheme, p.netloc, _quote(f"{base}/{bucket}/{key}", safe="/")
    return "https", f"{bucket}.s3.{settings.region}.amazonaws.com", _quote(f"/{key}", safe="/")


def parse_error(body: bytes) -> tuple[str, str]:
    """(Code, Message) of S3's XML error body; ("", "") when it has none."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return "", ""
    return (root.findtext("Code") or "").strip(), (root.findtext("Message") or "").strip()[:300]


_STATUS_CODES = {403: "AccessDenied", 404: "NotFound"}


# ---------------------------------------------------------------- the client

Body = Union[bytes, IO[bytes], None]


class Client:
    def __init__(self, settings: Optional[Settings] = None, timeout: float = 120.0):
        self.settings = settings or Settings.from_env()
        self.timeout = timeout

    def request(self, method: str, uri: str, *, query: Optional[Mapping[str, str]] = None, body: Body = None,
                length: int = 0, payload_sha256: str = EMPTY_SHA256, headers: Optional[Mapping[str, str]] = None,
                sink: Optional[IO[bytes]] = None) -> tuple[int, dict[str, str], bytes]:
        """One request, retried on no answer and 5xx (a file body is rewound). Returns (status,
        headers, body) of a 2xx; the body is written to ``sink`` instead when given. Raises S3Error."""
        bucket, key = parse_uri(uri)
        query = dict(query or {})
        scheme, host, path = address(self.settings, bucket, key)
        target = path + ("?" + canonical_query(query) if query else "")
        start = body.tell() if body is not None and not isinstance(body, bytes) else 0
        last: Optional[S3Error] = None
        for attempt in range(RETRIES):
            if attempt:
                time.sleep(min(2 ** attempt, 8))
                if body is not None and not isinstance(body, bytes):
                    body.seek(start)
                if sink is not None:  # a body cut short on the previous try: start the file again
                    sink.seek(0)
                    sink.truncate()
            extra = dict(headers or {})
            if body is not None or method in ("PUT", "POST"):
                extra["content-length"] = str(length if not isinstance(body, bytes) else len(body))
            signed = sign(method, host, path, query, extra, payload_sha256, self.settings,
                          _dt.datetime.now(_dt.timezone.utc))
            conn_cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            conn = conn_cls(host, timeout=self.timeout)
            try:
                conn.request(method, target, body=_limited(body, length), headers=signed)
                rsp = conn.getresponse()
                status = rsp.status
                if 200 <= status < 300:
                    expected = rsp.getheader("content-length")
                    if sink is not None:
                        got = _copy(rsp, sink)
                        data = b""
                    else:
                        data = rsp.read()
                        got = len(data)
                    if method != "HEAD" and expected is not None and expected.isdigit() and got != int(expected):
                        # http.client returns a body cut short without an error when read in blocks
                        raise http.client.IncompleteRead(b"", int(expected) - got)
                    return status, {k.lower(): v for k, v in rsp.getheaders()}, data
                data = rsp.read()
            except (OSError, http.client.HTTPException) as e:
                last = S3Error(uri, "Unreachable", f"{type(e).__name__}: {e}")
                continue
            finally:
                conn.close()
            code, message = parse_error(data)
            last = S3Error(uri, code or _STATUS_CODES.get(status, "Error"), message, status)
            if status < 500:
                raise last
        assert last is not None
        raise last

    # -- objects
    def head(self, uri: str) -> dict[str, str]:
        return self.request("HEAD", uri)[1]

    def get_file(self, uri: str, dest: str) -> int:
        """Download to ``dest`` through a temporary file beside it (never a partial ``dest``)."""
        with atomic_file(dest) as f:
            self.request("GET", uri, sink=f)
            n = f.tell()
        return n

    def get_bytes(self, uri: str) -> bytes:
        return self.request("GET", uri)[2]

    def put_bytes(self, uri: str, data: bytes) -> None:
        self.request("PUT", uri, body=data, payload_sha256=hashlib.sha256(data).hexdigest())

    def put_file(self, uri: str, path: str, sha256: Optional[str] = None) -> None:
        size = os.path.getsize(path)
        if size > MULTIPART_THRESHOLD:
            self._put_multipart(uri, path, size)
            return
        digest = sha256 or _sha256_path(path)
        with open(path, "rb") as f:
            self.request("PUT", uri, body=f, length=size, payload_sha256=digest)

    def delete(self, uri: str) -> None:
        """Delete an object; a missing one is no error (S3 answers 204 either way)."""
        try:
            self.request("DELETE", uri)
        except S3Error as e:
            if e.code not in ("NoSuchKey", "NotFound"):
                raise

    def _put_multipart(self, uri: str, path: str, size: int) -> None:
        _, _, data = self.request("POST", uri, query={"uploads": ""})
        upload_id = _xml_text(data, "UploadId")
        if not upload_id:
            raise S3Error(uri, "Error", "no UploadId in the answer to CreateMultipartUpload")
        parts: list[tuple[int, str]] = []
        try:
            with open(path, "rb") as f:
                number = 1
                for offset in range(0, size, PART_SIZE):
                    n = min(PART_SIZE, size - offset)
                    f.seek(offset)
                    digest = _sha256_range(f, n)
                    f.seek(offset)
                    _, hdrs, _ = self.request("PUT", uri, query={"partNumber": str(number), "uploadId": upload_id},
                                              body=f, length=n, payload_sha256=digest)
                    parts.append((number, hdrs.get("etag", "")))
                    number += 1
            xml = "<CompleteMultipartUpload>" + "".join(
                f"<Part><PartNumber>{n}</PartNumber><ETag>{_xml_escape(e)}</ETag></Part>" for n, e in parts
            ) + "</CompleteMultipartUpload>"
            body = xml.encode()
            _, _, answer = self.request("POST", uri, query={"uploadId": upload_id}, body=body,
                                        payload_sha256=hashlib.sha256(body).hexdigest())
            code, message = parse_error(answer)  # S3 may answer 200 with an error inside
            if code:
                raise S3Error(uri, code, message, 200)
        except BaseException:
            try:
                self.request("DELETE", uri, query={"uploadId": upload_id})
            except S3Error:
                pass
            raise


def _copy(src: Any, dst: IO[bytes]) -> int:
    n = 0
    while True:
        block = src.read(CHUNK)
        if not block:
            return n
        dst.write(block)
        n += len(block)


class _Limited:
    """At most ``n`` bytes of a file, read in blocks (http.client streams objects with read())."""

    def __init__(self, f: IO[bytes], n: int):
        self.f, self.left = f, n

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        size = self.left if size < 0 else min(size, self.left)
        data = self.f.read(size)
        self.left -= len(data)
        return data


def _limited(body: Body, length: int) -> Any:
    if body is None or isinstance(body, bytes):
        return body
    return _Limited(body, length)


def _xml_text(data: bytes, tag: str) -> str:
    try:
        root = ET.fromstring(data)
    except ET.ParseError:
        return ""
    for el in root.iter():
        if el.tag == tag or el.tag.endswith("}" + tag):
            return (el.text or "").strip()
    return ""


def _xml_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _sha256_path(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_range(f: IO[bytes], n: int) -> str:
    h = hashlib.sha256()
    while n > 0:
        block = f.read(min(CHUNK, n))
        if not block:
            break
        h.update(block)
        n -= len(block)
    return h.hexdigest()


# ---------------------------------------------------------------- adapters

def _manifest_files(manifest: Any, where: str) -> dict[str, str]:
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise S3Error(where, "Incomplete", f"{MANIFEST} lists no files")
    for name, digest in files.items():
        parts = str(name).split("/")
        if (not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or name == MANIFEST
                or not re.fullmatch(r"[0-9a-f]{64}", str(digest))):
            raise S3Error(where, "Incomplete", f"{MANIFEST} has an invalid entry {name!r}")
    return {str(k): str(v) for k, v in files.items()}


def upload_adapter(client: Client, adapter_dir: str, prefix: str) -> dict[str, Any]:
    """Upload a finished adapter directory (its ``tuneop-manifest.json`` lists every file with its
    sha256) to ``prefix``: the old manifest is deleted first (a reader sees no complete adapter while
    files are replaced), each file is uploaded, the manifest last. Returns {"uri", "files"}."""
    manifest_path = os.path.join(adapter_dir, MANIFEST)
    with open(manifest_path, "rb") as f:
        raw = f.read()
    files = _manifest_files(json.loads(raw), manifest_path)
    client.delete(join(prefix, MANIFEST))
    for name, digest in sorted(files.items()):
        path = os.path.join(adapter_dir, *name.split("/"))
        if _sha256_path(path) != digest:
            raise S3Error(join(prefix, name), "ChecksumMismatch", f"the local file {path} does not match {MANIFEST}")
        client.put_file(join(prefix, name), path, sha256=digest)
    client.put_bytes(join(prefix, MANIFEST), raw)
    return {"uri": prefix.rstrip("/"), "files": len(files)}


def download_adapter(client: Client, prefix: str, dest: str) -> dict[str, Any]:
    """Fetch the adapter at ``prefix`` into ``dest``: its manifest first (none: the upload did not
    finish, refused as Incomplete), then each listed file into a directory beside ``dest``, each
    checked against the manifest's sha256 (ChecksumMismatch); only then is it renamed to ``dest``.
    Returns the manifest."""
    manifest_uri = join(prefix, MANIFEST)
    try:
        raw = client.get_bytes(manifest_uri)
    except S3Error as e:
        if e.code in ("NoSuchKey", "NotFound"):
            raise S3Error(prefix, "Incomplete", f"no {MANIFEST}: the upload did not finish, or this is not an "
                          "adapter tuneop wrote") from None
        raise
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise S3Error(manifest_uri, "Incomplete", "not JSON") from None
    files = _manifest_files(manifest, manifest_uri)
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}-s3-", dir=parent)
    try:
        for name, digest in sorted(files.items()):
            local = os.path.join(work, *name.split("/"))
            uri = join(prefix, name)
            try:
                client.get_file(uri, local)
            except S3Error as e:
                if e.code in ("NoSuchKey", "NotFound"):
                    raise S3Error(uri, "Incomplete", f"listed in {MANIFEST} but missing") from None
                raise
            got = _sha256_path(local)
            if got != digest:
                raise S3Error(uri, "ChecksumMismatch", f"sha256 {got}, {MANIFEST} says {digest}")
        with open(os.path.join(work, MANIFEST), "wb") as f:
            f.write(raw)
        if os.path.lexists(dest):
            shutil.rmtree(dest)
        os.replace(work, dest)
        return manifest if isinstance(manifest, dict) else {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
