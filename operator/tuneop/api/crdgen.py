"""Generate CustomResourceDefinitions from the pydantic models (the single source of truth).

pydantic's JSON schema is turned into a structural OpenAPI v3 schema: $refs inlined, Optional
unwrapped, exclusive bounds in the OpenAPI 3.0 form, defaults of nested objects materialised so
the API server fills them in, and each model's `cel_rules` attached as x-kubernetes-validations.
"""
from __future__ import annotations

import copy
import typing
from typing import Any

import yaml

from . import adapterdeployment as ad
from . import finetunejob as ftj
from .common import GROUP, VERSION, Model


def _model_registry() -> dict[str, type[Model]]:
    out: dict[str, type[Model]] = {}
    stack = list(Model.__subclasses__())
    while stack:
        cls = stack.pop()
        out[cls.__name__] = cls
        stack.extend(cls.__subclasses__())
    return out


_DROP = {"title", "discriminator"}


def _convert(node: Any, defs: dict[str, Any], registry: dict[str, type[Model]]) -> Any:
    if isinstance(node, list):
        return [_convert(x, defs, registry) for x in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].split("/")[-1]
        merged = {**copy.deepcopy(defs[name]), **{k: v for k, v in node.items() if k != "$ref"}}
        resolved = _convert(merged, defs, registry)
        cls = registry.get(name)
        if cls is not None and cls.cel_rules:
            resolved["x-kubernetes-validations"] = [
                {"rule": rule, "message": msg} for rule, msg in cls.cel_rules
            ]
        return resolved
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(options) == 1:
            merged = {**options[0], **rest}
            return _convert(merged, defs, registry)
        rest["anyOf"] = options
        node = rest
    if "allOf" in node and len(node["allOf"]) == 1:
        rest = {k: v for k, v in node.items() if k != "allOf"}
        return _convert({**node["allOf"][0], **rest}, defs, registry)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key == "$defs":
            continue
        if key == "exclusiveMinimum":
            out["minimum"] = value
            out["exclusiveMinimum"] = True
        elif key == "exclusiveMaximum":
            out["maximum"] = value
            out["exclusiveMaximum"] = True
        elif key == "const":
            out["enum"] = [value]
        elif key == "properties":
            out["properties"] = {k: _convert(v, defs, registry) for k, v in value.items()}
        elif key == "default":
            if value is not None:
                out[key] = copy.deepcopy(value)
        elif key == "additionalProperties" and value is False:
            # Structural schemas forbid it; unknown fields are rejected by strict field validation.
            continue
        elif key in ("enum", "required"):
            out[key] = copy.deepcopy(value)
        else:
            out[key] = _convert(value, defs, registry)
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _fill_factory_defaults(model: type[Model], schema: dict[str, Any]) -> None:
    """pydantic leaves default_factory defaults out of the schema; the API server needs them."""
    props = schema.get("properties", {})
    for name, field in model.model_fields.items():
        alias = field.alias or name
        sub = props.get(alias)
        if sub is None:
            continue
        if field.default_factory is not None and "default" not in sub:
            value = field.default_factory()  # type: ignore[call-arg]
            if isinstance(value, Model):
                value = value.to_dict()
            sub["default"] = value
        ann = field.annotation
        inner = _model_of(ann)
        if inner is not None and sub.get("type") == "object":
            _fill_factory_defaults(inner, sub)


def _model_of(ann: Any) -> type[Model] | None:
    if isinstance(ann, type) and issubclass(ann, Model):
        return ann
    for arg in typing.get_args(ann):
        m = _model_of(arg)
        if m is not None:
            return m
    return None


def openapi_schema(model: type[Model]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    registry = _model_registry()
    schema: dict[str, Any] = _convert(raw, defs, registry)
    if model.cel_rules:
        schema["x-kubernetes-validations"] = [
            {"rule": r, "message": m} for r, m in model.cel_rules
        ]
    _fill_factory_defaults(model, schema)
    return schema


def build_crd(
    *,
    kind: str,
    plural: str,
    singular: str,
    short_names: list[str],
    spec_model: type[Model],
    status_model: type[Model],
    printer_columns: list[dict[str, Any]],
    description: str,
) -> dict[str, Any]:
    spec_schema = openapi_schema(spec_model)
    spec_schema["description"] = (spec_model.__doc__ or "").strip()
    status_schema = openapi_schema(status_model)
    # Status is written only by the operator; keep unknown fields (kopf's own bookkeeping).
    status_schema["x-kubernetes-preserve-unknown-fields"] = True
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": short_names,
                "categories": ["tuneop", "all"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer_columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def all_crds() -> dict[str, dict[str, Any]]:
    """File name in crds/ -> CRD object."""
    crds = {
        "finetunejobs.yaml": build_crd(
            kind=ftj.KIND,
            plural=ftj.PLURAL,
            singular=ftj.SINGULAR,
            short_names=ftj.SHORT_NAMES,
            spec_model=ftj.FineTuneJobSpec,
            status_model=ftj.FineTuneJobStatus,
            printer_columns=ftj.PRINTER_COLUMNS,
            description=(ftj.__doc__ or "").strip().splitlines()[0],
        )
    }
    crds["adapterdeployments.yaml"] = build_crd(
        kind=ad.KIND,
        plural=ad.PLURAL,
        singular=ad.SINGULAR,
        short_names=ad.SHORT_NAMES,
        spec_model=ad.AdapterDeploymentSpec,
        status_model=ad.AdapterDeploymentStatus,
        printer_columns=ad.PRINTER_COLUMNS,
        description=(ad.__doc__ or "").strip().splitlines()[0],
    )
    return crds


HEADER = "# Generated by `tuneop crds` from operator/tuneop/api; do not edit by hand.\n"


def render_yaml(crd: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(crd, sort_keys=False, width=100)
