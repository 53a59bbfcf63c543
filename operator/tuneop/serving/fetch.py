"""``python -m tuneop.serving.fetch --url URL --dest DIR [--sha256 HEX]``: the init container
of a vLLM pod that serves an adapter from a URL.

Downloads the archive (.tar.gz / .tar.zst / .tar; recognised by magic bytes), extracts it with
:func:`tuneop.archive.safe_extract` (no path escapes, size and file limits), finds the adapter
directory (the shallowest one with ``adapter_config.json``) and puts it at ``DIR``. Then checks
the sha256 of ``adapter_model.safetensors`` against ``--sha256``, else against the archive's
``tuneop-manifest.json`` when it has one; an archive without a manifest whose weights matched
``--sha256`` gets one listing every extracted file (the guard refuses an adapter without a
manifest unless the AdapterDeployment allows it: ``allowUnverified``). Exit 0 on success, 2 for a bad archive or a sha256
mismatch (the pod stays in Init:Error, visible in its termination message), 1 for download errors.

``--url s3://bucket/key`` (settings from the environment: ``tuneop.s3``): a key ending in an archive
suffix is downloaded and handled as above; any other is the prefix of an adapter ``output.s3`` uploaded:
its ``tuneop-manifest.json`` first (none: an upload that did not finish, refused), then every file it
lists, each checked against its sha256 and the weights against ``--sha256``, all in a directory beside
``DIR`` renamed into place only when everything matched. Refusals (a missing bucket or key, bad
credentials, an incomplete upload, a mismatch) exit 2 with a message naming the URI.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import urllib.request
from typing import Optional

from .. import s3
from ..archive import ArchiveError, find_adapter_dir, safe_extract
from ..trainer.manifest import MANIFEST, file_hashes, sha256_file, weights_file

CHUNK = 1 << 20
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tzst")


def download(url: str, dest_file: str, *, timeout: float = 300.0) -> int:
    if s3.is_s3(url):
        return s3.Client().get_file(url, dest_file)
    n = 0
    with urllib.request.urlopen(url, timeout=timeout) as rsp, open(dest_file, "wb") as f:  # noqa: S310
        while True:
            chunk = rsp.read(CHUNK)
            if not chunk:
                break
            f.write(chunk)
            n += len(chunk)
    return n


def expected_sha256(adapter_dir: str, given: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(weights file, expected sha256): --sha256 first, else the manifest's entry, else None."""
    weights = weights_file(adapter_dir)
    if given:
        return weights, given.lower()
    try:
        with open(os.path.join(adapter_dir, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return weights, None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    return weights, (files or {}).get(weights) if weights else None


def write_manifest(adapter_dir: str, url: str, weights_sha256: str) -> None:
    """The archive had no tuneop-manifest.json but its weights matched the sha256 the
    AdapterDeployment pins: record every extracted file, so that the guard verifies each file vLLM
    loads (without a manifest the adapter is served only with allowUnverified)."""
    manifest = {"source": "url", "url": url.split("?", 1)[0], "weightsSha256": weights_sha256,
                "files": file_hashes(adapter_dir)}
    with open(os.path.join(adapter_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def fetch(url: str, dest: str, sha256: Optional[str] = None) -> dict[str, Optional[str]]:
    """Download + extract + verify; returns {"path", "sha256"}. Raises ArchiveError (S3Error for s3://)."""
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}-fetch-", dir=parent)
    try:
        if s3.is_s3(url) and not url.lower().endswith(ARCHIVE_SUFFIXES):
            return _fetch_s3_adapter(url, dest, sha256, work)
        archive = os.path.join(work, "archive")
        download(url, archive)
        root = os.path.join(work, "x")
        safe_extract(archive, root)
        adapter = find_adapter_dir(root)
        weights, want = expected_sha256(adapter, sha256)
        if weights is None:
            raise ArchiveError("the adapter has no adapter_model.safetensors")
        got = sha256_file(os.path.join(adapter, weights))
        if want and got != want:
            raise ArchiveError(f"sha256 mismatch of {weights}: expected {want}, got {got}")
        if want and not os.path.exists(os.path.join(adapter, MANIFEST)):
            write_manifest(adapter, url, got)
        if os.path.lexists(dest):
            shutil.rmtree(dest)
        os.replace(adapter, dest)
        return {"path": dest, "sha256": got}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fetch_s3_adapter(prefix: str, dest: str, sha256: Optional[str], work: str) -> dict[str, Optional[str]]:
    staged = os.path.join(work, "adapter")
    s3.download_adapter(s3.Client(), prefix, staged)
    weights = weights_file(staged)
    if weights is None:
        raise s3.S3Error(prefix, "Incomplete", "the adapter has no adapter_model.safetensors")
    got = sha256_file(os.path.join(staged, weights))
    if sha256 and got != sha256.lower():
        raise s3.S3Error(s3.join(prefix, weights), "ChecksumMismatch", f"sha256 {got}, expected {sha256.lower()}")
    if os.path.lexists(dest):
        shutil.rmtree(dest)
    os.replace(staged, dest)
    return {"path": dest, "sha256": got}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tuneop.serving.fetch", description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--dest", required=True)
    p.add_argument("--sha256")
    a = p.parse_args(argv)
    try:
        out = fetch(a.url, a.dest, a.sha256)
    except ArchiveError as e:
        print(json.dumps({"event": "error", "reason": "ArchiveInvalid", "message": str(e)}), flush=True)
        return 2
    except s3.S3Error as e:
        refused = e.client_error
        print(json.dumps({"event": "error", "reason": "AdapterRefused" if refused else "DownloadFailed",
                          "message": str(e)}), flush=True)
        return 2 if refused else 1
    except OSError as e:  # urllib errors are OSErrors
        print(json.dumps({"event": "error", "reason": "DownloadFailed", "message": str(e)}), flush=True)
        return 1
    print(json.dumps({"event": "done", "adapter": out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
