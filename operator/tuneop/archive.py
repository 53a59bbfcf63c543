"""Safe extraction of downloaded model archives, and the adapter layout they end in.

Shared by the Together download pod (``python -m tuneop.backends.together.pod download``) and, later, adapter URL
downloads. No torch here.

``size_limit(*, adapter_type, lora_r, models, free_bytes) -> (max_bytes, source)``
    How much an adapter archive may expand to: a bound from the LoRA rank and the base model's
    parameter count (read from its name, :func:`model_params`), or for full weights from the
    parameter count alone, never more than the free space of the output volume; the default
    (64 GiB) only when the model's size is unknown. ``source`` says where the limit came from, for
    the error message.

``safe_extract(archive_path, dest_dir, *, max_bytes, max_files, limit_source) -> list[str]``
    Extracts a tar archive — gzip, zstd or uncompressed, recognised by magic bytes, never by file
    name — streaming. Rejects (:class:`ArchiveError`): absolute member names, ``..`` components,
    symlinks or hard links whose target would leave the archive root, device files and FIFOs, more
    than ``max_files`` members, more than ``max_bytes`` of content (counted while writing, so a
    lying header does not help), unknown formats and corrupt data. Links that stay inside are
    materialised as copies of files extracted earlier (no symlink is ever written to disk, so no
    later member can write through one); other inside links are skipped. Everything is written to
    a temporary directory next to ``dest_dir`` and renamed into place at the end: a failure leaves
    no trace, a success replaces an older ``dest_dir`` whole. Returns the extracted files
    (relative POSIX paths).

``find_adapter_dir(root, adapter_type="lora") -> str``
    The directory holding ``adapter_config.json`` (Together nests it in a subdirectory), or for
    ``full`` the one holding ``config.json`` and ``*.safetensors``; the shallowest wins.

``write_adapter_layout(src_dir, out_dir, *, base_model, method, adapter_type, extra=None,
source="together") -> manifest dict``
    Copies the regular files of ``src_dir`` (not recursive) to ``<out_dir>/adapter/`` with
    ``tuneop-manifest.json`` — the same layout and manifest the in-cluster trainer writes
    (``{"baseModel","method","adapterType","files":{name: sha256},"metrics":{},"evaluation":null,
    "createdAt","source", ...extra}``), atomically (temp dir + rename). A LoRA adapter must have a
    JSON-object ``adapter_config.json`` and ``adapter_model.safetensors``.

``adapter_summary(adapter_dir) -> {"path","sha256","manifestSha256","sizeBytes"}``
    The termination message's ``adapter`` block for a written layout.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import zlib
from typing import IO, Any, Iterable, Optional, cast

from .trainer.manifest import MANIFEST, dir_size, sha256_file, weights_file, write_adapter_dir

__all__ = [
    "ArchiveError",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_FILES",
    "detect_format",
    "model_params",
    "size_limit",
    "safe_extract",
    "find_adapter_dir",
    "write_adapter_layout",
    "adapter_summary",
]

DEFAULT_MAX_BYTES = 64 << 30  # 64 GiB of extracted content
DEFAULT_MAX_FILES = 10_000
_CHUNK = 1 << 20
# size_limit: an adapted matrix (d_in x d_out) gets r * (d_in + d_out) LoRA weights, at most
# 2r / min(d_in, d_out) of its own size; hidden sizes of LLMs are >= 512. Weights counted as fp32.
MIN_HIDDEN = 512
BYTES_PER_PARAM = 4
LORA_MARGIN = 2  # x the largest adapter the rank allows
FULL_MARGIN = 1.25  # x the fp32 weights of the whole model
EXTRA_FILES_BYTES = 256 << 20  # tokenizer, configs, README next to the weights

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class ArchiveError(Exception):
    """A bad or unsafe archive (a user-facing error: the download is not retried as is)."""


def detect_format(path: str) -> str:
    """``"gzip"``, ``"zstd"`` or ``"tar"`` from the first bytes; ArchiveError otherwise."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    raise ArchiveError("not a tar.gz, tar.zst or tar archive (unrecognised magic bytes)")


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def model_params(name: Optional[str]) -> Optional[float]:
    """The parameter count a model name states (``Meta-Llama-3.1-8B-Instruct`` -> 8e9,
    ``SmolLM2-135M`` -> 1.35e8, ``Mixtral-8x7B`` -> 5.6e10), or None."""
    base = str(name or "").rsplit("/", 1)[-1]
    found: Optional[float] = None
    for m in re.finditer(r"(?<![A-Za-z0-9.])(?:(\d+)x)?(\d+(?:\.\d+)?)([BbMm])(?![A-Za-z0-9])", base):
        count = float(m.group(2)) * (1e9 if m.group(3) in "Bb" else 1e6) * (int(m.group(1)) if m.group(1) else 1)
        found = max(found or 0.0, count)
    return found if found else None


def size_limit(
    *,
    adapter_type: str,
    lora_r: int = 0,
    models: Iterable[Optional[str]] = (),
    free_bytes: Optional[int] = None,
    default: int = DEFAULT_MAX_BYTES,
) -> tuple[int, str]:
    """``(max_bytes, source)``: the most an adapter archive may hold once extracted, and where that
    figure came from. LoRA (and qlora): ``LORA_MARGIN x params x 2r/MIN_HIDDEN x 4 bytes +
    EXTRA_FILES_BYTES``; full: ``FULL_MARGIN x params x 4 bytes + EXTRA_FILES_BYTES``; the first of
    ``models`` whose name states a size (:func:`model_params`) gives ``params``; without one,
    ``default``. Never more than ``free_bytes`` (the output volume's free space), when known."""
    named = [(m, model_params(m)) for m in models if m]
    model, params = next(((m, p) for m, p in named if p), (None, None))
    size = "?" if not params else (f"{params / 1e9:g}B" if params >= 1e9 else f"{params / 1e6:g}M")
    if params and adapter_type == "full":
        limit = int(FULL_MARGIN * params * BYTES_PER_PARAM) + EXTRA_FILES_BYTES
        source = f"full weights of the {size}-parameter base model {model}"
    elif params:
        rank = max(1, int(lora_r or 0))
        limit = int(LORA_MARGIN * params * 2 * rank / MIN_HIDDEN * BYTES_PER_PARAM) + EXTRA_FILES_BYTES
        source = f"estimated from LoRA rank {rank} and the {size}-parameter base model {model}"
    else:
        limit = int(default)
        source = "the default limit: the base model's size is unknown"
    if free_bytes is not None and 0 <= free_bytes < limit:
        return int(free_bytes), f"the free space of the output volume; {source} would allow {_human(limit)}"
    return limit, source


def _member_path(name: str) -> str:
    """Normalised relative path of a member; ArchiveError when absolute or escaping."""
    if "\x00" in name:
        raise ArchiveError(f"archive member name with a NUL byte: {name!r}")
    raw = name.replace("\\", "/")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise ArchiveError(f"archive member with an absolute path: {name!r}")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ArchiveError(f"archive member with '..' in its path: {name!r}")
    return "/".join(parts)


def _link_target(member: tarfile.TarInfo, rel: str) -> str:
    """The archive-relative path a link member points to; ArchiveError when it leaves the root."""
    target = member.linkname.replace("\\", "/")
    if not target:
        raise ArchiveError(f"link {member.name!r} without a target")
    if target.startswith("/"):
        raise ArchiveError(f"link {member.name!r} points outside the archive: {member.linkname!r}")
    if member.issym():
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    else:  # hard links are relative to the archive root
        joined = posixpath.normpath(target)
    if joined == ".." or joined.startswith("../") or joined.startswith("/"):
        raise ArchiveError(f"link {member.name!r} points outside the archive: {member.linkname!r}")
    return joined


def _open_stream(path: str, fmt: str, raw: IO[bytes]) -> IO[bytes]:
    if fmt == "gzip":
        # typeshed types GzipFile as a BufferedIOBase, not IO[bytes]; it reads like any binary stream
        return cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
    if fmt == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw


def _mkdirs(root: str, rel: str) -> str:
    """mkdir -p root/rel, refusing to pass through anything that is not a real directory."""
    path = root
    for part in [p for p in rel.split("/") if p]:
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise ArchiveError(f"archive member {rel!r} needs a directory where a file is")
    return path


def _too_big(max_bytes: int, limit_source: str) -> ArchiveError:
    return ArchiveError(f"archive content exceeds the size limit of {_human(max_bytes)}"
                        + (f" ({limit_source})" if limit_source else ""))


def _write_file(root: str, rel: str, src: IO[bytes], budget: list[Any]) -> None:
    parent = _mkdirs(root, posixpath.dirname(rel))
    full = os.path.join(parent, posixpath.basename(rel))
    try:
        st = os.lstat(full)
        if stat.S_ISDIR(st.st_mode):
            raise ArchiveError(f"archive member {rel!r} is both a directory and a file")
        os.unlink(full)  # a duplicate member: the later one wins, as with tar
    except FileNotFoundError:
        pass
    fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as out:
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                break
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise _too_big(budget[1], budget[2])
            out.write(chunk)


def _extract_into(archive_path: str, root: str, max_bytes: int, max_files: int,
                  limit_source: str = "") -> list[str]:
    fmt = detect_format(archive_path)
    budget: list[Any] = [int(max_bytes), int(max_bytes), limit_source]  # left, limit, its source
    files: list[str] = []
    count = 0
    with open(archive_path, "rb") as raw:
        stream = _open_stream(archive_path, fmt, raw)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    count += 1
                    if count > max_files:
                        raise ArchiveError(f"archive has more than {max_files} members")
                    rel = _member_path(member.name)
                    if member.isdir():
                        if rel:
                            _mkdirs(root, rel)
                        continue
                    if not rel:
                        raise ArchiveError(f"archive member with an empty name: {member.name!r}")
                    if member.issym() or member.islnk():
                        target = _link_target(member, rel)
                        src = os.path.join(root, *target.split("/")) if target not in ("", ".") else root
                        if target in files and os.path.isfile(src) and not os.path.islink(src):
                            with open(src, "rb") as f:
                                _write_file(root, rel, f, budget)
                            files.append(rel)
                        continue  # inside link to something not (yet) extracted: skipped
                    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
                        raise ArchiveError(f"archive member {member.name!r} is a device file or FIFO")
                    if not member.isfile():
                        raise ArchiveError(f"archive member {member.name!r} has an unsupported type")
                    if member.size > budget[0]:
                        raise _too_big(budget[1], budget[2])
                    fobj = tar.extractfile(member)
                    if fobj is None:  # pragma: no cover
                        raise ArchiveError(f"cannot read archive member {member.name!r}")
                    _write_file(root, rel, fobj, budget)
                    if rel not in files:
                        files.append(rel)
        finally:
            if stream is not raw:
                stream.close()
    return sorted(files)


def safe_extract(
    archive_path: str,
    dest_dir: str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    limit_source: str = "",
) -> list[str]:
    """See the module docstring. Raises ArchiveError for a bad or unsafe archive; ``limit_source``
    (where ``max_bytes`` came from, see :func:`size_limit`) goes into the size error."""
    dest_dir = os.path.abspath(dest_dir)
    parent = os.path.dirname(dest_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest_dir)}-extract-", dir=parent)
    try:
        try:
            files = _extract_into(archive_path, tmp, max_bytes, max_files, limit_source)
        except ArchiveError:
            raise
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise ArchiveError(f"corrupt archive: {e}") from None
        except Exception as e:  # zstandard.ZstdError and friends
            if "zstandard" in (type(e).__module__ or "") or type(e).__name__ == "ZstdError":
                raise ArchiveError(f"corrupt archive: {e}") from None
            raise
        if not files:
            raise ArchiveError("archive holds no files")
        _swap_into_place(tmp, dest_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def _swap_into_place(tmp: str, final: str) -> None:
    old = None
    if os.path.lexists(final):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}-old-", dir=os.path.dirname(final))
        os.rmdir(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.unlink(old)


# ---------------------------------------------------------------------------------- layout


def find_adapter_dir(root: str, adapter_type: str = "lora") -> str:
    """The shallowest directory under ``root`` holding ``adapter_config.json`` (for
    ``adapter_type == "full"``: ``config.json`` plus a ``*.safetensors`` file). ArchiveError when
    there is none."""
    best: Optional[tuple[int, str]] = None
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        names = set(filenames)
        if adapter_type == "full":
            ok = "config.json" in names and any(n.endswith(".safetensors") or n.endswith(".index.json") for n in names)
        else:
            ok = "adapter_config.json" in names
        if ok:
            depth = os.path.relpath(dirpath, root).count(os.sep)
            if best is None or depth < best[0]:
                best = (depth, dirpath)
    if best is None:
        what = "config.json and *.safetensors" if adapter_type == "full" else "adapter_config.json"
        raise ArchiveError(f"the archive has no {what}")
    return best[1]


def _check_adapter_files(src_dir: str, adapter_type: str) -> None:
    if adapter_type == "full":
        if not os.path.isfile(os.path.join(src_dir, "config.json")):
            raise ArchiveError("full model without config.json")
        return
    cfg_path = os.path.join(src_dir, "adapter_config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ArchiveError(f"adapter_config.json is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ArchiveError("adapter_config.json is not a JSON object")
    weights = os.path.join(src_dir, "adapter_model.safetensors")
    if not os.path.isfile(weights) or os.path.getsize(weights) < 8:
        raise ArchiveError("the adapter has no adapter_model.safetensors")


def write_adapter_layout(
    src_dir: str,
    out_dir: str,
    *,
    base_model: str,
    method: str,
    adapter_type: str,
    extra: Optional[dict[str, Any]] = None,
    source: str = "together",
) -> dict[str, Any]:
    """See the module docstring. Returns the manifest written to
    ``<out_dir>/adapter/tuneop-manifest.json``."""

    _check_adapter_files(src_dir, adapter_type)
    names = sorted(
        n for n in os.listdir(src_dir)
        if n != MANIFEST and os.path.isfile(os.path.join(src_dir, n)) and not os.path.islink(os.path.join(src_dir, n))
    )

    def save(tmp: str) -> None:
        for n in names:
            shutil.copyfile(os.path.join(src_dir, n), os.path.join(tmp, n))

    fields = {
        "base_model": base_model,
        "method": method,
        "adapter_type": adapter_type,
        "metrics": {},
        "evaluation": None,
        "extra": {"source": source, **(extra or {})},
    }
    block = write_adapter_dir(out_dir, save, fields)
    with open(os.path.join(block["path"], MANIFEST), encoding="utf-8") as f:
        return json.load(f)


def adapter_summary(adapter_dir: str) -> dict[str, Any]:
    """``{"path", "sha256" (of the weights file), "manifestSha256", "sizeBytes"}``."""

    manifest_path = os.path.join(adapter_dir, MANIFEST)
    with open(manifest_path, "rb") as f:
        data = f.read()
    manifest = json.loads(data)
    weights = weights_file(adapter_dir)
    sha = (manifest.get("files") or {}).get(weights) if weights else None
    if weights and not sha:
        sha = sha256_file(os.path.join(adapter_dir, weights))
    return {
        "path": adapter_dir,
        "sha256": sha,
        "manifestSha256": hashlib.sha256(data).hexdigest(),
        "sizeBytes": dir_size(adapter_dir),
    }
