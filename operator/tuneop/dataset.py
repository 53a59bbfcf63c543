"""Dataset checks: format detection, line-by-line validation, token estimate, TRL-ready rows.

Pure Python (stdlib only): this runs inside the operator (ConfigMap datasets) and in the small
CPU-only validation pod (PVC and URL datasets), so it must not import torch/transformers/datasets.

A dataset is JSONL: one JSON object per line, UTF-8 (a leading BOM is tolerated). Blank lines are
skipped. Every row of a file has the same format, one of ``FORMATS``:

``messages``
    ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``: an optional
    single leading system message, then user and assistant alternate starting with user, and the
    last message is from the assistant.
``prompt-completion``
    ``{"prompt": "...", "completion": "..."}``, or conversational (as TRL accepts it):
    ``{"prompt": [messages ending with a user turn], "completion": [assistant messages]}``.
``text``
    ``{"text": "..."}``.
``preference`` (DPO)
    TRL's ``{"prompt", "chosen", "rejected"}`` (all strings, or all lists of messages: prompt ending
    with a user turn, chosen/rejected assistant messages), or Together's
    ``{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": ...}],
    "non_preferred_output": [...]}`` which is normalised to TRL's conversational shape.

Unknown extra keys are ignored. With ``declared="auto"`` a row that carries the keys of two formats
(e.g. ``messages`` and ``prompt``) is an error; with an explicit format the declared format's keys
are used and any others are ignored.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

__all__ = [
    "FORMATS",
    "DatasetError",
    "LineError",
    "DatasetReport",
    "detect_format",
    "check_lines",
    "check_file",
    "normalize_row",
    "read_rows",
    "to_together_preference",
]

FORMATS = ("messages", "prompt-completion", "text", "preference")

ROLES = ("system", "user", "assistant")
_TRL_PREF_KEYS = ("prompt", "chosen", "rejected")
_TOGETHER_PREF_KEYS = ("input", "preferred_output", "non_preferred_output")
_EXPECTED = "'messages', 'prompt'+'completion', 'text' or 'prompt'+'chosen'+'rejected'"
_SUMMARY_ERRORS = 3  # errors spelled out in DatasetReport.summary()
_MAX_MESSAGE = 300  # characters of one LineError message


# ---------------------------------------------------------------------------------------------
# report types


@dataclass
class LineError:
    """One problem: ``line`` is 1-based; 0 means the whole file (unreadable, no rows)."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line > 0 else self.message


@dataclass
class DatasetReport:
    """Result of checking one dataset file.

    ``rows`` counts the non-blank lines (valid or not); ``errors`` holds at most ``max_errors``
    entries while ``total_errors`` counts all of them. ``estimated_tokens`` is a cheap heuristic:
    characters of all text fields of the valid rows / 4, no tokenizer involved.
    """

    ok: bool
    format: Optional[str]
    rows: int
    estimated_tokens: int
    errors: list[LineError] = field(default_factory=list)
    source: str = ""
    total_errors: int = 0

    def __post_init__(self) -> None:
        if self.total_errors < len(self.errors):
            self.total_errors = len(self.errors)

    def summary(self) -> str:
        """``"4000 rows, ~0.9M tokens"`` or ``"train.jsonl line 7: invalid JSON: ...; line 9: ...
        (and 3 more errors)"``."""
        if self.ok:
            return f"{_plural(self.rows, 'row')}, ~{_human_tokens(self.estimated_tokens)} tokens"
        shown = self.errors[:_SUMMARY_ERRORS]
        parts = [str(e) for e in shown]
        if not parts:  # not ok but nothing recorded: should not happen, stay readable anyway
            parts = [_plural(self.total_errors, "error") if self.total_errors else "invalid dataset"]
        text = "; ".join(parts)
        if self.source and not (shown and shown[0].line == 0 and self.source in shown[0].message):
            sep = " " if shown and shown[0].line > 0 else ": "
            text = f"{self.source}{sep}{text}"
        more = self.total_errors - len(shown)
        if more > 0:
            text += f" (and {_plural(more, 'more error')})"
        return text

    def to_dict(self) -> dict:
        """camelCase JSON-able dict (termination message, status)."""
        return {
            "ok": self.ok,
            "format": self.format,
            "rows": self.rows,
            "estimatedTokens": self.estimated_tokens,
            "errors": [{"line": e.line, "message": e.message} for e in self.errors],
            "totalErrors": self.total_errors,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "DatasetReport":
        """Inverse of :meth:`to_dict` (e.g. the report in a validation pod's termination message)."""
        errors = [LineError(int(e.get("line", 0)), str(e.get("message", ""))) for e in data.get("errors") or []]
        return cls(
            ok=bool(data.get("ok")),
            format=data.get("format"),
            rows=int(data.get("rows") or 0),
            estimated_tokens=int(data.get("estimatedTokens") or 0),
            errors=errors,
            source=str(data.get("source") or ""),
            total_errors=int(data.get("totalErrors") or 0),
        )


class DatasetError(Exception):
    """An invalid dataset. ``.report`` is the :class:`DatasetReport`; ``str()`` its summary."""

    def __init__(self, report: Union[DatasetReport, str]):
        if not isinstance(report, DatasetReport):
            report = DatasetReport(False, None, 0, 0, [LineError(0, str(report))])
        super().__init__(report)
        self.report = report

    def __str__(self) -> str:
        return self.report.summary()


class _RowError(ValueError):
    """One row is invalid; the message names the field."""


# ---------------------------------------------------------------------------------------------
# small helpers


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _human_tokens(n: int) -> str:
    """842 -> "842", 12345 -> "12.3K", 900000 -> "0.9M", 2.5e9 -> "2.5B"."""
    if n < 1000:
        return str(n)
    div, unit = (1e3, "K") if n < 99_950 else (1e6, "M") if n < 99_950_000 else (1e9, "B")
    s = f"{n / div:.1f}"
    return (s[:-2] if s.endswith(".0") else s) + unit


def _jtype(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__  # pragma: no cover


def _short(value: Any, limit: int = 40) -> str:
    try:
        s = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):  # pragma: no cover
        s = repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _keys(row: dict, limit: int = 8) -> str:
    names = [_short(str(k), 30).replace('"', "'") for k in list(row)[:limit]]
    more = len(row) - limit
    return ", ".join(names) + (f" (+{more} more)" if more > 0 else "") if names else "none"


def _quote_list(keys: list[str]) -> str:
    q = [f"'{k}'" for k in keys]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + " and " + q[-1]


def _require(row: dict, keys: Iterable[str]) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise _RowError(f"missing {_quote_list(missing)} (row has keys: {_keys(row)})")


def _declared(declared: Any) -> str:
    if declared is None:
        return "auto"
    declared = getattr(declared, "value", declared)  # tuneop.api DatasetFormat enum
    if declared != "auto" and declared not in FORMATS:
        raise ValueError(f"unknown dataset format {declared!r}; expected auto or one of {', '.join(FORMATS)}")
    return str(declared)


# ---------------------------------------------------------------------------------------------
# format detection


def _classify(row: Any) -> tuple[Optional[str], Optional[str]]:
    """(format, None), (None, ambiguity message) or (None, None) when no format's keys are there."""
    if not isinstance(row, dict):
        return None, None
    found: dict[str, list[str]] = {}
    if "messages" in row:
        found["messages"] = ["messages"]
    if "text" in row:
        found["text"] = ["text"]
    if "completion" in row:
        found["prompt-completion"] = ["prompt", "completion"] if "prompt" in row else ["completion"]
    pref = [k for k in ("chosen", "rejected", "preferred_output", "non_preferred_output") if k in row]
    if pref:
        found["preference"] = (["prompt"] if "prompt" in row else []) + pref
    if len(found) == 1:
        fmt = next(iter(found))
        if fmt in ("messages", "text") and "prompt" in row:
            return None, f"ambiguous row: has both '{fmt}' and 'prompt'"
        return fmt, None
    if len(found) > 1:
        keys = [k for ks in found.values() for k in ks]
        return None, (
            f"ambiguous row: has keys of several formats ({_quote_list(list(dict.fromkeys(keys)))}: "
            f"{', '.join(repr(f) for f in found)})"
        )
    return None, None


def detect_format(row: dict) -> Optional[str]:
    """The format whose keys the row has (not whether the row is valid), or None when the row has
    no known format's keys or the keys of several formats (e.g. ``messages`` and ``prompt``)."""
    return _classify(row)[0]


# ---------------------------------------------------------------------------------------------
# row validation + normalisation


def _message_list(value: Any, name: str, roles: tuple[str, ...] = ROLES) -> list[dict]:
    if not isinstance(value, list) or not value:
        got = "an empty array" if isinstance(value, list) else _jtype(value)
        raise _RowError(f"'{name}' must be a non-empty list of messages, got {got}")
    out = []
    for i, msg in enumerate(value):
        p = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise _RowError(f"{p}: expected a message object with 'role' and 'content', got {_jtype(msg)}")
        if "role" not in msg:
            raise _RowError(f"{p}: missing 'role'")
        if "content" not in msg:
            raise _RowError(f"{p}: missing 'content'")
        role = msg["role"]
        if not isinstance(role, str) or role not in roles:
            if len(roles) == 1:
                raise _RowError(f"{p}.role must be '{roles[0]}', got {_short(role)}")
            raise _RowError(f"{p}.role: {_short(role)} is not one of {', '.join(roles)}")
        content = msg["content"]
        if not isinstance(content, str):
            raise _RowError(f"{p}.content must be a string, got {_jtype(content)}")
        if not content or (role == "assistant" and not content.strip()):
            raise _RowError(f"{p}.content is empty")
        out.append({"role": role, "content": content})
    return out


def _check_turns(msgs: list[dict], name: str, last: str) -> None:
    """Optional leading system message, then user/assistant alternating from user; ends with `last`."""
    start = 1 if msgs[0]["role"] == "system" else 0
    if start >= len(msgs):
        raise _RowError(f"'{name}' has only a system message")
    expected = "user"
    for i in range(start, len(msgs)):
        role = msgs[i]["role"]
        if role == "system":
            raise _RowError(f"{name}[{i}].role: 'system' is only allowed as the first message")
        if role != expected:
            raise _RowError(
                f"{name}[{i}].role: expected '{expected}', got '{role}' "
                "(user and assistant turns must alternate, starting with user)"
            )
        expected = "assistant" if expected == "user" else "user"
    if msgs[-1]["role"] != last:
        raise _RowError(f"{name}: the last message must be from '{last}', got '{msgs[-1]['role']}'")


def _string(row: dict, key: str, strip: bool) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise _RowError(f"'{key}' must be a string, got {_jtype(value)}")
    if not (value.strip() if strip else value):
        raise _RowError(f"'{key}' is empty")
    return value


def _norm_messages(row: dict) -> dict:
    _require(row, ["messages"])
    msgs = _message_list(row["messages"], "messages")
    _check_turns(msgs, "messages", "assistant")
    return {"messages": msgs}


def _norm_text(row: dict) -> dict:
    _require(row, ["text"])
    return {"text": _string(row, "text", strip=True)}


def _norm_prompt_completion(row: dict) -> dict:
    _require(row, ["prompt", "completion"])
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise _RowError(f"'completion' must be a string like 'prompt', got {_jtype(completion)}")
        return {"prompt": _string(row, "prompt", strip=False), "completion": _string(row, "completion", strip=True)}
    if isinstance(prompt, list):
        pm = _message_list(prompt, "prompt")
        _check_turns(pm, "prompt", "user")
        if not isinstance(completion, list):
            raise _RowError(
                f"'completion' must be a list of assistant messages like 'prompt', got {_jtype(completion)}"
            )
        return {"prompt": pm, "completion": _message_list(completion, "completion", ("assistant",))}
    raise _RowError(f"'prompt' must be a string or a list of messages, got {_jtype(prompt)}")


def _norm_preference(row: dict) -> dict:
    together = [k for k in ("preferred_output", "non_preferred_output") if k in row]
    if together:
        trl = [k for k in _TRL_PREF_KEYS if k in row]
        if trl:
            raise _RowError(
                f"ambiguous row: mixes TRL preference keys ({_quote_list(trl)}) "
                f"and Together keys ({_quote_list(together)})"
            )
        _require(row, _TOGETHER_PREF_KEYS)
        inp = row["input"]
        if not isinstance(inp, dict):
            raise _RowError(f"'input' must be an object with 'messages', got {_jtype(inp)}")
        if "messages" not in inp:
            raise _RowError("missing 'input.messages'")
        prompt = _message_list(inp["messages"], "input.messages")
        _check_turns(prompt, "input.messages", "user")
        out: dict[str, Any] = {"prompt": prompt}
        for key, dst in (("preferred_output", "chosen"), ("non_preferred_output", "rejected")):
            msgs = _message_list(row[key], key, ("assistant",))
            if len(msgs) != 1:
                raise _RowError(f"'{key}' must hold exactly one assistant message, got {len(msgs)}")
            out[dst] = msgs
        if out["chosen"] == out["rejected"]:
            raise _RowError("'preferred_output' and 'non_preferred_output' are identical")
        return out

    _require(row, _TRL_PREF_KEYS)
    prompt = row["prompt"]
    if isinstance(prompt, str):
        out = {"prompt": _string(row, "prompt", strip=False)}
        for key in ("chosen", "rejected"):
            if not isinstance(row[key], str):
                raise _RowError(f"'{key}' must be a string like 'prompt', got {_jtype(row[key])}")
            out[key] = _string(row, key, strip=True)
    elif isinstance(prompt, list):
        pm = _message_list(prompt, "prompt")
        _check_turns(pm, "prompt", "user")
        out = {"prompt": pm}
        for key in ("chosen", "rejected"):
            if not isinstance(row[key], list):
                raise _RowError(
                    f"'{key}' must be a list of assistant messages like 'prompt', got {_jtype(row[key])}"
                )
            out[key] = _message_list(row[key], key, ("assistant",))
    else:
        raise _RowError(f"'prompt' must be a string or a list of messages, got {_jtype(prompt)}")
    if out["chosen"] == out["rejected"]:
        raise _RowError("'chosen' and 'rejected' are identical")
    return out


_NORMALIZERS = {
    "messages": _norm_messages,
    "prompt-completion": _norm_prompt_completion,
    "text": _norm_text,
    "preference": _norm_preference,
}


def _chars(norm: dict) -> int:
    n = 0
    for value in norm.values():
        if isinstance(value, str):
            n += len(value)
        else:
            n += sum(len(m["content"]) for m in value)
    return n


def normalize_row(row: dict, fmt: str) -> dict:
    """The TRL-ready row: ``{"messages"}`` (role/content only), ``{"prompt", "completion"}``,
    ``{"text"}`` or ``{"prompt", "chosen", "rejected"}`` (Together preference rows become TRL's
    conversational shape). ``fmt`` may be ``"auto"``. Raises ValueError naming the field when the
    row is not valid for ``fmt``."""
    fmt = _declared(fmt)
    if not isinstance(row, dict):
        raise _RowError(f"expected a JSON object, got {_jtype(row)}")
    if fmt == "auto":
        detected, ambiguity = _classify(row)
        if detected is None:
            raise _RowError(ambiguity or f"unrecognised row: expected {_EXPECTED} (row has keys: {_keys(row)})")
        fmt = detected
    return _NORMALIZERS[fmt](row)


def to_together_preference(row: dict) -> dict:
    """A preference row (TRL or Together shape) -> Together's
    ``{"input": {"messages"}, "preferred_output": [...], "non_preferred_output": [...]}``.
    String prompts become one user message, string answers one assistant message. Raises
    ValueError when the row is invalid or an answer has more than one message (Together takes one)."""
    norm = normalize_row(row, "preference")
    prompt = norm["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]

    def answer(key: str) -> list[dict]:
        value = norm[key]
        if isinstance(value, str):
            return [{"role": "assistant", "content": value}]
        if len(value) != 1:
            raise ValueError(f"Together needs exactly one assistant message in '{key}', got {len(value)}")
        return [dict(value[0])]

    return {
        "input": {"messages": [dict(m) for m in prompt]},
        "preferred_output": answer("chosen"),
        "non_preferred_output": answer("rejected"),
    }


# ---------------------------------------------------------------------------------------------
# file checks


def _scan(
    lines: Union[Iterable[Union[str, bytes]], str, bytes],
    declared: Any,
    max_errors: int,
    source: str,
    collect: bool,
) -> tuple[DatasetReport, list[dict]]:
    declared = _declared(declared)
    explicit = declared != "auto"
    file_fmt: Optional[str] = declared if explicit else None
    fmt_line = 0
    max_errors = max(1, int(max_errors))
    rows = chars = total = 0
    errors: list[LineError] = []
    out: list[dict] = []

    def error(line: int, message: str) -> None:
        nonlocal total
        total += 1
        if len(errors) < max_errors:
            if len(message) > _MAX_MESSAGE:
                message = message[: _MAX_MESSAGE - 3] + "..."
            errors.append(LineError(line, message))

    if isinstance(lines, str):
        lines = lines.split("\n")
    elif isinstance(lines, (bytes, bytearray)):
        lines = bytes(lines).split(b"\n")

    for lineno, raw in enumerate(lines, 1):
        if isinstance(raw, (bytes, bytearray)):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = bytes(raw).decode("utf-8")
            except UnicodeDecodeError as e:
                if not raw.strip():
                    continue
                rows += 1
                error(lineno, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
        else:
            text = raw
            if lineno == 1 and text.startswith("\ufeff"):
                text = text[1:]
        if not text.strip():
            continue
        rows += 1
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            error(lineno, f"invalid JSON: {e.msg} (column {e.colno})")
            continue
        except RecursionError:
            error(lineno, "invalid JSON: nested too deeply")
            continue
        if not isinstance(row, dict):
            error(lineno, f"expected a JSON object, got {_jtype(row)}")
            continue

        detected, ambiguity = _classify(row)
        if explicit:
            fmt = declared
        else:
            if ambiguity:
                error(lineno, ambiguity + " (keep one format's keys, or set dataset.format)")
                continue
            if file_fmt is not None and detected is not None and detected != file_fmt:
                error(lineno, f"row looks like '{detected}' but the file is '{file_fmt}' (set by line {fmt_line})")
                continue
            fmt = file_fmt or detected
            if fmt is None:
                error(lineno, f"unrecognised row: expected {_EXPECTED} (row has keys: {_keys(row)})")
                continue
        try:
            norm = _NORMALIZERS[fmt](row)
        except _RowError as e:
            message = str(e)
            if explicit and detected is not None and detected != declared:
                message += f"; the row looks like '{detected}' but dataset.format is '{declared}'"
            error(lineno, message)
            continue
        if file_fmt is None:
            file_fmt, fmt_line = fmt, lineno
        chars += _chars(norm)
        if collect:
            out.append(norm)

    if rows == 0 and total == 0:
        error(0, "no rows")
    report = DatasetReport(
        ok=total == 0,
        format=file_fmt,
        rows=rows,
        estimated_tokens=(chars + 3) // 4,
        errors=errors,
        source=source,
        total_errors=total,
    )
    return report, out


def check_lines(
    lines: Iterable[str], declared: str = "auto", max_errors: int = 10, source: str = ""
) -> DatasetReport:
    """Check JSONL lines (1 item = 1 line; ``str`` or ``bytes`` items, trailing newlines allowed).

    A whole document may be passed as one ``str``/``bytes``: it is split on ``\\n`` only (do not use
    ``str.splitlines()``, which also splits on U+2028 etc. that JSON strings may contain raw).
    Up to ``max_errors`` errors are kept (at least 1), all are counted. Raises ValueError for an
    unknown ``declared`` format.
    """
    return _scan(lines, declared, max_errors, source, collect=False)[0]


def _unreadable(path: Any, err: OSError, declared: str, source: str) -> DatasetReport:
    reason = err.strerror or str(err) or type(err).__name__
    return DatasetReport(
        ok=False,
        format=None if declared == "auto" else declared,
        rows=0,
        estimated_tokens=0,
        errors=[LineError(0, f"cannot read {os.fspath(path)}: {reason}")],
        source=source,
    )


def _file_scan(path: Any, declared: Any, max_errors: int, source: Optional[str], collect: bool):
    declared = _declared(declared)
    src = os.fspath(path) if source is None else source
    try:
        with open(path, "rb") as f:
            return _scan(f, declared, max_errors, src, collect)
    except OSError as e:
        return _unreadable(path, e, declared, src), []


def check_file(
    path: Union[str, os.PathLike],
    declared: str = "auto",
    max_errors: int = 10,
    *,
    source: Optional[str] = None,
) -> DatasetReport:
    """Check a JSONL file (streamed). A missing/unreadable file gives a report with one error on
    line 0 naming the path. ``source`` (default: the path) is the name used in the summary."""
    return _file_scan(path, declared, max_errors, source, collect=False)[0]


def read_rows(
    path: Union[str, os.PathLike], declared: str = "auto", *, source: Optional[str] = None
) -> tuple[str, list[dict]]:
    """Check the whole file; raise DatasetError if it is not valid; else return
    ``(format, normalized rows)`` (see :func:`normalize_row`)."""
    report, rows = _file_scan(path, declared, 10, source, collect=True)
    if not report.ok:
        raise DatasetError(report)
    assert report.format is not None
    return report.format, rows
