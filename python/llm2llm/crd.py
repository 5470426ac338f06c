"""Generate the AugmentationRun CustomResourceDefinition from the pydantic models.

Pydantic emits JSON Schema 2020-12 with $refs; Kubernetes wants a structural OpenAPI v3 schema: every
node typed, refs inlined, no nullable unions, booleans for exclusive bounds. The conversion is small and
total over the constructs our models use; anything else raises, so a new field type cannot slip into the
CRD silently.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from .spec import API_VERSION, CROSS_FIELD_RULES, GROUP, KIND, NAME_RE, PLURAL, VERSION, AugmentationRunSpec
from .status import RunStatus

_DROP = {"title"}
# Internal mark on object fields whose default is None (``X | None = None``: absent means "off"); such
# objects must not get a ``{}`` default, or the API server would switch them on. Removed from the output.
_OFF = "x-llm2llm-off-by-default"
_PASS = {"description", "default", "enum", "minimum", "maximum", "minLength", "maxLength", "pattern",
         "minItems", "maxItems", "format"}


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = defs[node["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _convert(merged, defs)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"unsupported union in schema: {node}")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        off = rest.get("default", "x") is None
        if off:
            rest.pop("default")
        out = _convert({**branches[0], **rest}, defs)
        if off and out["type"] == "object":
            out[_OFF] = True
        return out
    if "const" in node:
        node = {**node, "enum": [node["const"]]}
        node.pop("const")
    out: dict[str, Any] = {}
    typ = node.get("type")
    if typ is None and "enum" in node:
        typ = "string"
    if typ not in {"object", "array", "string", "integer", "number", "boolean"}:
        raise ValueError(f"untyped schema node: {node}")
    out["type"] = typ
    for key, value in node.items():
        if key in _DROP or key in {"type", "properties", "required", "items", "additionalProperties",
                                   "exclusiveMinimum", "exclusiveMaximum", "maxProperties"}:
            continue
        if key not in _PASS:
            raise ValueError(f"unsupported schema keyword {key!r} in {node}")
        out[key] = value
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node:
            out[plain] = node[bound]
            out[bound] = True
    if "default" in out and out["default"] is None:
        out.pop("default")
    if typ == "object":
        props = node.get("properties")
        if props:
            out["properties"] = {k: _convert(v, defs) for k, v in props.items()}
            if node.get("required"):
                out["required"] = list(node["required"])
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = _convert(extra, defs)
        elif not props:
            out["x-kubernetes-preserve-unknown-fields"] = True
    if typ == "array":
        out["items"] = _convert(node["items"], defs)
    return out


def openapi_schema(model: type) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _convert(raw, defs)


def _default_empty_objects(node: dict[str, Any]) -> None:
    """Give each optional sub-object a ``{}`` default so the API server fills in its nested defaults
    (it only defaults inside objects that are present). Object defaults from pydantic are dropped: they
    would freeze today's nested values into the CRD."""
    for prop in node.get("properties", {}).values():
        if prop.get("type") == "object" and "properties" in prop:
            prop.pop("default", None)
            if not prop.get("required") and not prop.get(_OFF):
                prop["default"] = {}
            _default_empty_objects(prop)


def _drop_marks(node: dict[str, Any]) -> None:
    node.pop(_OFF, None)
    for child in node.get("properties", {}).values():
        _drop_marks(child)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            _drop_marks(node[key])


def _spec_schema() -> dict[str, Any]:
    schema = openapi_schema(AugmentationRunSpec)
    _default_empty_objects(schema)
    _drop_marks(schema)
    schema["x-kubernetes-validations"] = [{"rule": r.cel, "message": r.message} for r in CROSS_FIELD_RULES]
    return schema


def _status_schema() -> dict[str, Any]:
    schema = openapi_schema(RunStatus)
    # Status is written only by the operator; defaults there would just add noise.
    def strip(n: dict[str, Any]) -> None:
        n.pop("default", None)
        for child in n.get("properties", {}).values():
            strip(child)
        if isinstance(n.get("items"), dict):
            strip(n["items"])
        if isinstance(n.get("additionalProperties"), dict):
            strip(n["additionalProperties"])
    strip(schema)
    _drop_marks(schema)
    schema["properties"]["conditions"]["x-kubernetes-list-type"] = "map"
    schema["properties"]["conditions"]["x-kubernetes-list-map-keys"] = ["type"]
    return schema


def crd() -> dict[str, Any]:
    """The CRD as a plain dict."""
    columns = [
        ("Phase", "string", ".status.phase", None),
        ("Iteration", "string", ".status.iterationLabel", None),
        ("Seed-Acc", "number", ".status.seedAccuracy", None),
        ("Test-Acc", "number", ".status.testAccuracy", None),
        ("Augmented", "integer", ".status.augmentedRows", None),
        ("Age", "date", ".metadata.creationTimestamp", None),
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": "augmentationrun",
                "shortNames": ["augrun", "augruns"],
                "categories": ["llm2llm"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": n, "type": t, "jsonPath": p, **({"format": f} if f else {})}
                        for n, t, p, f in columns
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": f"{KIND} ({API_VERSION}): one LLM2LLM iterative data-augmentation run.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {
                                    "type": "object",
                                    "properties": {"name": {"type": "string", "maxLength": 63,
                                                            "pattern": NAME_RE.pattern}},
                                },
                                "spec": _spec_schema(),
                                "status": _status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def crd_yaml() -> str:
    header = "# Generated by `llm2llm crd` from python/llm2llm/spec.py and status.py. DO NOT EDIT.\n"
    return header + yaml.dump(copy.deepcopy(crd()), Dumper=_Dumper, sort_keys=False, width=120)
