"""Reading resource YAML with errors a person can act on (field path and line number)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import yaml
from pydantic import ValidationError

from .api.common import API_VERSION
from .api.finetunejob import KIND, FineTuneJobSpec


class ManifestError(ValueError):
    pass


def _walk(node: yaml.Node, path: tuple) -> Iterator[tuple[tuple, int]]:
    yield path, node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value
            yield path + (k,), key.start_mark.line + 1
            yield from _walk(value, path + (k,))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _walk(item, path + (i,))


def line_index(text: str) -> list[dict[tuple, int]]:
    """One {path tuple: line} map per YAML document."""
    out = []
    for doc in yaml.compose_all(text):
        if doc is None:
            continue
        index: dict[tuple, int] = {}
        for path, line in _walk(doc, ()):
            index.setdefault(path, line)
        out.append(index)
    return out


def _line_for(index: dict[tuple, int], loc: tuple) -> int | None:
    loc = tuple(loc)
    while loc:
        if loc in index:
            return index[loc]
        loc = loc[:-1]
    return index.get(())


def format_validation_error(
    err: ValidationError, prefix: tuple = ("spec",), index: dict[tuple, int] | None = None, source: str = ""
) -> str:
    lines = []
    for e in err.errors():
        loc = prefix + tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        field = ".".join(str(x) if not isinstance(x, int) else f"[{x}]" for x in loc).replace(".[", "[")
        where = ""
        if index is not None:
            line = _line_for(index, loc)
            if line is not None:
                where = f"{source}:{line}: " if source else f"line {line}: "
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{where}{field}: {msg}")
    return "\n".join(lines)


def load_documents(path: str | Path) -> list[tuple[dict[str, Any], dict[tuple, int]]]:
    text = Path(path).read_text()
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        indexes = line_index(text)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from exc
    return list(zip(docs, indexes))


def load_finetunejob(path: str | Path) -> dict[str, Any]:
    """The first FineTuneJob in a YAML file, its spec validated; errors name field and line."""

    for doc, index in load_documents(path):
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            continue
        if doc.get("apiVersion") != API_VERSION:
            raise ManifestError(
                f"{path}:{index.get(('apiVersion',), 1)}: apiVersion must be {API_VERSION}"
            )
        name = (doc.get("metadata") or {}).get("name")
        if not name:
            raise ManifestError(f"{path}: metadata.name is required")
        try:
            spec = FineTuneJobSpec.model_validate(doc.get("spec") or {})
        except ValidationError as exc:
            raise ManifestError(
                f"FineTuneJob {name} is invalid:\n"
                + format_validation_error(exc, index=index, source=str(path))
            ) from None
        return {"doc": doc, "spec": spec}
    raise ManifestError(f"{path}: no {KIND} found")
