"""Check an object against a generated CRD the way the API server would, without a cluster.

Structural defaulting, OpenAPI v3 validation (jsonschema, draft 4 semantics as in OpenAPI 3.0),
strict field validation (unknown fields rejected, as `kubectl apply` does by default) and the
x-kubernetes-validations CEL rules (evaluated with cel-python). Used by the contract tests and by
`tuneop validate`; jsonschema and cel-python are test/dev dependencies, imported lazily.
"""
from __future__ import annotations

import copy
from typing import Any


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    if not isinstance(obj, dict) or schema.get("type") != "object":
        if isinstance(obj, list) and "items" in schema:
            return [apply_defaults(schema["items"], x) for x in obj]
        return obj
    out = dict(obj)
    for key, sub in schema.get("properties", {}).items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if key in out:
            out[key] = apply_defaults(sub, out[key])
    return out


def _unknown_fields(schema: dict[str, Any], obj: Any, path: str) -> list[str]:
    errors: list[str] = []
    if isinstance(obj, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return errors
        props = schema.get("properties")
        addl = schema.get("additionalProperties")
        for key, value in obj.items():
            if props is not None and key in props:
                errors += _unknown_fields(props[key], value, f"{path}.{key}")
            elif isinstance(addl, dict):
                errors += _unknown_fields(addl, value, f"{path}.{key}")
            elif props is not None:
                errors.append(f'{path}.{key}: unknown field "{key}"')
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            errors += _unknown_fields(schema["items"], item, f"{path}[{i}]")
    return errors


def _cel(schema: dict[str, Any], obj: Any, path: str) -> list[str]:
    import celpy

    errors: list[str] = []
    for v in schema.get("x-kubernetes-validations", []):
        env = celpy.Environment()
        program = env.program(env.compile(v["rule"]))
        try:
            ok = program.evaluate({"self": celpy.json_to_cel(obj)})
        except Exception as exc:  # a rule that cannot evaluate is a bug in the rule
            errors.append(f"{path}: rule {v['rule']!r} failed to evaluate: {exc}")
            continue
        if not bool(ok):
            errors.append(f"{path}: {v['message']}")
    if isinstance(obj, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in obj:
                errors += _cel(sub, obj[key], f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            errors += _cel(schema["items"], item, f"{path}[{i}]")
    return errors


def check(obj: dict[str, Any], crd: dict[str, Any]) -> list[str]:
    """Errors the API server would report when this object is applied (empty list: accepted)."""
    import jsonschema

    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    if obj.get("kind") != crd["spec"]["names"]["kind"]:
        return [f"kind {obj.get('kind')!r} is not {crd['spec']['names']['kind']}"]
    errors = _unknown_fields(schema, obj, "")
    obj = apply_defaults(schema, obj)
    validator = jsonschema.Draft4Validator(schema)
    for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in e.absolute_path)
        errors.append(f".{where}: {e.message}")
    if not errors:
        errors += _cel(schema, obj, "")
    return [e.lstrip(".") for e in errors]
