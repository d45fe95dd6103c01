"""The API spec as routes and JSON Schemas, so requests are checked by the spec, not by hand.

Swagger 2.0 describes bodies with JSON Schema Draft 4 (plus a few Swagger keywords that Draft 4
ignores, such as readOnly and format: int64). Firecracker deserializes with serde's
deny_unknown_fields, so every object schema that does not say otherwise gets
``additionalProperties: false``. $refs stay ``#/definitions/...`` and resolve against the
definitions themselves (they are the validator's root document).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

DEFAULT_SPEC = Path(__file__).resolve().parents[4].parent / "shared/reference/firecracker-api.yaml"

# PATCH /machine-config is a partial update (Firecracker's MachineConfigUpdate has only optional
# fields) though the spec reuses MachineConfiguration, whose two fields are required.
_PARTIAL = {"patchMachineConfiguration"}
# Firecracker's rule for resource ids (drive_id, iface_id, pmem id).
_ID = re.compile(r"^[A-Za-z0-9_]{1,64}$")


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML 1.1 reads the bare words Off/On/Yes/No as booleans (the logger level enum has
    `Off`); the spec means strings, so only true/false are booleans here."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


class SpecError(Exception):
    """A request the spec does not allow (answered 400 with this message)."""


@dataclass(frozen=True)
class Operation:
    operation_id: str
    method: str
    template: str
    path_params: dict[str, str]
    body_definition: str | None  # the definitions/ name of the body, if it has one
    body_required: bool


def _closed(node: Any) -> Any:
    """A copy where every object schema with properties rejects unknown fields."""
    if isinstance(node, list):
        return [_closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _closed(value) for key, value in node.items()}
    if out.get("type") == "object" and "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


class Spec:
    def __init__(self, path: Path = DEFAULT_SPEC) -> None:
        with path.open() as f:
            doc = yaml.load(f, Loader=_Loader)  # a SafeLoader subclass
        self.version: str = doc["info"]["version"]
        self.definitions: dict[str, Any] = _closed(doc["definitions"])
        self._routes: list[tuple[re.Pattern[str], str, dict[str, Any]]] = []
        for template, methods in doc["paths"].items():
            pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
            self._routes.append((re.compile(f"^{pattern}$"), template, methods))
        self._validators: dict[tuple[str, bool], jsonschema.Draft4Validator] = {}

    def match(self, method: str, path: str) -> Operation:
        for pattern, template, methods in self._routes:
            m = pattern.match(path)
            if m is None:
                continue
            op = methods.get(method.lower())
            if op is None:
                break
            body = [p for p in op.get("parameters", []) if p["in"] == "body"]
            definition = body[0]["schema"]["$ref"].rsplit("/", 1)[1] if body else None
            return Operation(
                op["operationId"],
                method,
                template,
                m.groupdict(),
                definition,
                bool(body and body[0].get("required")),
            )
        raise SpecError(f"Invalid request method and/or path: {method} {path}.")

    def validate(self, definition: str, body: Any, *, partial: bool = False) -> None:
        key = (definition, partial)
        if key not in self._validators:
            schema = copy.deepcopy(self.definitions[definition])
            if partial:
                schema.pop("required", None)
            schema["definitions"] = self.definitions
            self._validators[key] = jsonschema.Draft4Validator(schema)
        error = jsonschema.exceptions.best_match(self._validators[key].iter_errors(body))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path)
            raise SpecError(
                f"An error occurred when deserializing the json body of a request: "
                f"{where + ': ' if where else ''}{error.message}."
            )

    def check_body(self, op: Operation, body: Any) -> Any:
        """The body to act on; a missing optional body counts as {}."""
        for name, value in op.path_params.items():
            if not _ID.match(value):
                raise SpecError(f"Invalid {name} {value!r}: alphanumeric and '_', 1-64 characters.")
        if op.body_definition is None:
            if body is not None:
                raise SpecError(f"{op.method} {op.template} takes no body.")
            return None
        if body is None:
            if op.body_required:
                raise SpecError("The request body is missing (empty request).")
            body = {}
        self.validate(op.body_definition, body, partial=op.operation_id in _PARTIAL)
        for name, value in op.path_params.items():
            if name in body and body[name] != value:
                raise SpecError(f"The {name} in the path does not match the {name} in the body.")
        return body
