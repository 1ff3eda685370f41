#!/usr/bin/env python3
"""Validate rendered Kubernetes manifests offline, against real schemas.

Usage:
    python validate_manifests.py [--k8s-version 1.33.0] [--jobset-crd PATH] FILE_OR_DIR...

Each FILE is YAML, possibly multi-document; a DIR means every *.yaml / *.yml in it
(sorted, not recursive).  Every document is checked:

* ``jobset.x-k8s.io/v1alpha2`` ``JobSet``: against the ``openAPIV3Schema`` of the
  JobSet CustomResourceDefinition (default: the copy of JobSet v0.12.0 next to this
  script), converted to a JSON schema the way the API server reads a structural
  schema with strict field validation: unknown fields are refused,
  ``x-kubernetes-int-or-string`` becomes ``anyOf [integer, string]``,
  ``x-kubernetes-list-type: map/set`` refuses duplicate keys/items and
  ``format: int32/int64`` is range-checked.  The top-level ``metadata`` (only
  ``type: object`` in the CRD) is checked as an ObjectMeta.  The CRD's CEL rules are
  not evaluated, except the two that do not compare against an old object, which
  are re-implemented here, along with the create-time checks of JobSet's
  validating webhook (names the manifest must satisfy to be admitted).
* every other document: ``kubernetes-validate`` in strict mode (unknown fields
  refused) against the bundled schemas of the chosen Kubernetes version.  A
  kind/apiVersion it has no schema for is a FAILURE (the upstream CLI only warns).

All documents additionally get a few API-server checks that no schema expresses:
``metadata.name`` present and a DNS-1123 subdomain (DNS-1035 label for Services),
label keys/values syntax, ConfigMap/Secret data keys, base64 in ``Secret.data``.
Duplicate mapping keys in the YAML are refused.

Output: one line per document, ``ok  Kind/name`` or ``FAIL Kind/name: <errors>``
(errors ``; ``-separated, each as ``$.json.path: message``), then a summary on stderr.
Exit status: 0 when every document passes, 1 when any fails or there is no
document at all, 2 on a usage/setup error (unknown Kubernetes version, missing
CRD file, unreadable input).  No network access is needed.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import copy
import functools
import os
import re
import sys
import time
from typing import Any, Iterable, Iterator

import jsonschema
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

import kubernetes_validate
from kubernetes_validate import utils as kv_utils

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CRD = os.path.join(HERE, "jobset.x-k8s.io_jobsets-v0.12.0.yaml")
DEFAULT_K8S_VERSION = "1.33.0"
MAX_ERRORS_PER_DOC = 50


class SetupError(Exception):
    """A problem with the arguments or the environment, not with a manifest (exit 2)."""


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (the API server's decoder does too)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    mapping: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in mapping
        except TypeError:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, "found an unhashable key", key_node.start_mark
            )
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def expand_inputs(paths: Iterable[str]) -> list[str]:
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            files.extend(
                os.path.join(p, n) for n in sorted(os.listdir(p)) if n.endswith((".yaml", ".yml"))
                and os.path.isfile(os.path.join(p, n))
            )
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise SetupError(f"no such file or directory: {p}")
    return files


# ------------------------------------------------------------------- reporting


def _json_path(path: Iterable[Any]) -> str:
    out = "$"
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(part)):
            out += f".{part}"
        else:
            out += f"[{str(part)!r}]"
    return out


def _describe(err: jsonschema.ValidationError) -> str:
    msg = err.message
    if err.context:  # anyOf/oneOf: say which branch came closest
        best = jsonschema.exceptions.best_match(err.context)
        if best is not None and best.message != msg:
            msg += f" ({_json_path(best.absolute_path)}: {best.message})"
    if len(msg) > 400:
        msg = msg[:400] + "..."
    return f"{_json_path(err.absolute_path)}: {msg}"


def _errors_to_strings(errors: Iterable[jsonschema.ValidationError]) -> list[str]:
    errs = sorted(errors, key=lambda e: ([str(p) for p in e.absolute_path], e.message))
    return [_describe(e) for e in errs]


def doc_label(doc: Any) -> str:
    if not isinstance(doc, dict):
        return f"<{type(doc).__name__} document>"
    kind = doc.get("kind") if isinstance(doc.get("kind"), str) and doc.get("kind") else "<no kind>"
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name = meta.get("name") if isinstance(meta.get("name"), str) and meta.get("name") else "<no name>"
    return f"{kind}/{name}"


# ------------------------------------------------------ common API-server checks

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def dns1123_subdomain_errors(value: str) -> list[str]:
    errs = []
    if len(value) > 253:
        errs.append("must be no more than 253 characters")
    if not _DNS1123_SUBDOMAIN.match(value):
        errs.append("must be a lowercase RFC 1123 subdomain")
    return errs


def dns1035_label_errors(value: str) -> list[str]:
    errs = []
    if len(value) > 63:
        errs.append("must be no more than 63 characters")
    if not _DNS1035_LABEL.match(value):
        errs.append("must be a lowercase RFC 1035 label ([a-z]([-a-z0-9]*[a-z0-9])?)")
    return errs


def _label_errors(labels: dict, path: str) -> list[str]:
    errs = []
    for key, value in labels.items():
        if not isinstance(key, str):
            errs.append(f"{path}: label key {key!r} is not a string")
            continue
        prefix, _, name = key.rpartition("/")
        if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
            errs.append(f"{path}: label key {key!r}: prefix must be a DNS-1123 subdomain")
        if not name or len(name) > 63 or not _QUALIFIED_NAME.match(name):
            errs.append(f"{path}: label key {key!r}: name part must be 1-63 alphanumerics, '-', '_', '.'")
        if isinstance(value, str) and (len(value) > 63 or not _LABEL_VALUE.match(value)):
            errs.append(f"{path}: label value {value!r} for {key!r} is not a valid label value")
    return errs


def _walk_label_maps(node: Any, path: list) -> Iterator[tuple[dict, str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "metadata" and isinstance(v, dict) and isinstance(v.get("labels"), dict):
                yield v["labels"], _json_path(path + [k, "labels"])
            elif k == "matchLabels" and isinstance(v, dict):
                yield v, _json_path(path + [k])
            yield from _walk_label_maps(v, path + [k])
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk_label_maps(v, path + [i])


def common_checks(doc: dict) -> list[str]:
    """Checks the API server makes on every object that the JSON schemas do not express."""
    errs: list[str] = []
    for field in ("apiVersion", "kind"):
        if not isinstance(doc.get(field), str) or not doc.get(field):
            errs.append(f"$.{field}: required, must be a non-empty string")
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        errs.append("$.metadata: required, must be an object")
        return errs
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        errs.append("$.metadata.name: required, must be a non-empty string")
    elif doc.get("kind") == "Service" and doc.get("apiVersion") == "v1":
        errs.extend(f"$.metadata.name: {name!r} {e}" for e in dns1035_label_errors(name))
    else:
        errs.extend(f"$.metadata.name: {name!r} {e}" for e in dns1123_subdomain_errors(name))
    ns = meta.get("namespace")
    if isinstance(ns, str) and (len(ns) > 63 or not _DNS1123_LABEL.match(ns)):
        errs.append(f"$.metadata.namespace: {ns!r} must be a DNS-1123 label")
    for labels, path in _walk_label_maps(doc, []):
        errs.extend(_label_errors(labels, path))
    if doc.get("apiVersion") == "v1" and doc.get("kind") in ("ConfigMap", "Secret"):
        seen: set = set()
        for field in ("data", "binaryData", "stringData"):
            data = doc.get(field)
            if not isinstance(data, dict):
                continue
            for key, value in data.items():
                if not isinstance(key, str) or len(key) > 253 or not _CONFIG_KEY.match(key):
                    errs.append(f"$.{field}: key {key!r} must consist of alphanumerics, '-', '_' or '.'")
                if doc["kind"] == "ConfigMap" and key in seen:
                    errs.append(f"$.{field}: key {key!r} also appears in another data field")
                seen.add(key)
                if field in ("binaryData",) or (doc["kind"] == "Secret" and field == "data"):
                    if isinstance(value, str):
                        try:
                            base64.b64decode(value, validate=True)
                        except (binascii.Error, ValueError):
                            errs.append(f"{_json_path([field, key])}: not valid base64")
    return errs


# ------------------------------------------------------------ kubernetes-validate


def bundled_k8s_versions() -> list[str]:
    return list(dict.fromkeys(kv_utils.all_versions()))  # it lists -local and -local-strict


def resolve_k8s_version(requested: str) -> tuple[str, str | None]:
    """Return (bundled version to use, note or None)."""
    requested = requested[1:] if requested.startswith("v") else requested
    bundled = bundled_k8s_versions()
    if requested in bundled:
        return requested, None
    mm = kv_utils.major_minor(requested)
    same_minor = [v for v in bundled if kv_utils.major_minor(v) == mm]
    if same_minor:
        use = same_minor[-1]
        return use, f"kubernetes-validate bundles no {requested}; using its {mm} schemas ({use})"
    raise SetupError(
        f"kubernetes-validate {kubernetes_validate.__version__} bundles no schemas for Kubernetes {mm} "
        f"(it has {', '.join(bundled)})"
    )


@functools.lru_cache(maxsize=None)
def _k8s_validator(version: str, kind: str, api_version: str) -> Draft202012Validator:
    """Same schema files and resolution as kubernetes_validate.validate(strict=True),
    kept so that *every* error can be listed (the library raises only the first)."""
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema_dir = f"kubernetes-json-schema/v{version}-local-strict"
    schema = kv_utils.schema_contents(f"{schema_dir}/{kind.lower()}-{api}.json", version)
    defs = _k8s_definitions(version)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    return Draft202012Validator(schema, registry=registry)


@functools.lru_cache(maxsize=None)
def _k8s_definitions(version: str) -> Any:
    return kv_utils.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)


def validate_core(doc: dict, version: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
        return []
    except kubernetes_validate.ValidationError as first:
        first_msg = f"{_json_path(first.path)}: {first.message}"
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    except kubernetes_validate.utils.VersionNotSupportedError as e:
        return [e.message]
    except kubernetes_validate.InvalidSchemaError as e:
        return [e.message]
    except Exception as e:  # noqa: BLE001 - any failure to validate is a failure
        return [f"could not be validated: {type(e).__name__}: {e}"]
    try:
        errs = _errors_to_strings(_k8s_validator(version, doc["kind"], doc["apiVersion"]).iter_errors(doc))
    except Exception:  # noqa: BLE001 - fall back to the library's single error
        errs = []
    return errs or [first_msg]


# ------------------------------------------------------------------ CRD schemas

_OBJECT_META_SCHEMA: dict = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["apiVersion", "kind", "name", "uid"],
                "additionalProperties": False,
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "name": {"type": "string"},
                    "uid": {"type": "string"},
                    "controller": {"type": "boolean"},
                    "blockOwnerDeletion": {"type": "boolean"},
                },
            },
        },
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer"},
        "creationTimestamp": {"type": ["string", "null"]},
        "deletionTimestamp": {"type": "string"},
        "deletionGracePeriodSeconds": {"type": "integer"},
        "managedFields": {"type": "array", "items": {"type": "object"}},
        "selfLink": {"type": "string"},
    },
}

_SCHEMA_MAP_KEYS = ("properties", "patternProperties", "definitions", "$defs")
_SCHEMA_KEYS = ("items", "additionalProperties", "not", "additionalItems")
_SCHEMA_LIST_KEYS = ("anyOf", "oneOf", "allOf")
_DATA_KEYS = ("default", "enum", "example", "const")


def convert_crd_schema(node: Any) -> Any:
    """openAPIV3Schema (structural, with x-kubernetes-* extensions) -> JSON Schema."""
    if not isinstance(node, dict):
        return node
    out: dict = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in _SCHEMA_MAP_KEYS and isinstance(value, dict):
            out[key] = {k: convert_crd_schema(v) for k, v in value.items()}
        elif key in _SCHEMA_KEYS and isinstance(value, dict):
            out[key] = convert_crd_schema(value)
        elif key in _SCHEMA_LIST_KEYS and isinstance(value, list):
            out[key] = [convert_crd_schema(v) for v in value]
        elif key in _DATA_KEYS:
            out[key] = copy.deepcopy(value)
        else:
            out[key] = value
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if node.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string") is True:
        out.pop("type", None)
        if "anyOf" not in out:
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-embedded-resource") is True:
        # The API server treats such an object as a full resource: apiVersion and kind
        # are required and apiVersion/kind/metadata are always allowed.
        out["required"] = sorted(set(out.get("required", [])) | {"apiVersion", "kind"})
        if "properties" in out:
            props = out["properties"]
            props.setdefault("apiVersion", {"type": "string"})
            props.setdefault("kind", {"type": "string"})
            props.setdefault("metadata", {"type": "object"})
    if "properties" in out and not preserve and "additionalProperties" not in out:
        out["additionalProperties"] = False
    list_type = node.get("x-kubernetes-list-type")
    if list_type == "set":
        out["uniqueItems"] = True
    elif list_type == "map" and node.get("x-kubernetes-list-map-keys"):
        out["x-m3d-list-map-keys"] = list(node["x-kubernetes-list-map-keys"])
    return out


def _list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map: no two items may share the same key tuple
    (a missing key takes the item schema's default, as the API server does)."""
    if not validator.is_type(instance, "array"):
        return
    item_props = schema.get("items", {}).get("properties", {})
    seen: dict = {}
    for index, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(repr(item.get(k, item_props.get(k, {}).get("default"))) for k in keys)
        if key in seen:
            shown = ", ".join(f"{k}={item.get(k, item_props.get(k, {}).get('default'))!r}" for k in keys)
            yield jsonschema.ValidationError(
                f"duplicate entry [{shown}] (also at index {seen[key]}); list-map keys {keys} must be unique",
                path=[index],
            )
        else:
            seen[key] = index


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker(formats=())

    @checker.checks("int32")
    def _int32(value: Any) -> bool:
        return not isinstance(value, int) or isinstance(value, bool) or -(2**31) <= value < 2**31

    @checker.checks("int64")
    def _int64(value: Any) -> bool:
        return not isinstance(value, int) or isinstance(value, bool) or -(2**63) <= value < 2**63

    return checker


_CrdValidator = jsonschema.validators.extend(Draft202012Validator, {"x-m3d-list-map-keys": _list_map_keys})


@functools.lru_cache(maxsize=None)
def load_crd_validators(path: str) -> dict[tuple[str, str], Any]:
    """{(apiVersion, kind): validator} for every served version of every CRD in the file."""
    if not os.path.isfile(path):
        raise SetupError(f"CRD file not found: {path}")
    with open(path, encoding="utf-8") as f:
        crds = [d for d in yaml.load_all(f, Loader=yaml.CSafeLoader if hasattr(yaml, "CSafeLoader") else yaml.SafeLoader) if d]
    out: dict = {}
    for crd in crds:
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        group = crd["spec"]["group"]
        kind = crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served", True):
                continue
            raw = version.get("schema", {}).get("openAPIV3Schema")
            if raw is None:
                raise SetupError(f"{path}: {group}/{version['name']} has no openAPIV3Schema")
            schema = convert_crd_schema(raw)
            schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
            api_version = f"{group}/{version['name']}"
            props = schema.setdefault("properties", {})
            props["apiVersion"] = {"const": api_version}
            props["kind"] = {"const": kind}
            props["metadata"] = _OBJECT_META_SCHEMA
            schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
            schema["additionalProperties"] = False
            # (no _CrdValidator.check_schema(schema): it costs ~1s for this schema and the
            # conversion only emits standard keywords)
            out[(api_version, kind)] = _CrdValidator(schema, format_checker=_format_checker())
    if not out:
        raise SetupError(f"{path}: no CustomResourceDefinition with a served version found")
    return out


# ----------------------------------------- JobSet: CEL rules + webhook (create)

_VALID_JOB_FAILURE_REASONS = (
    "BackoffLimitExceeded",
    "DeadlineExceeded",
    "FailedIndexes",
    "MaxFailedIndexesExceeded",
    "PodFailurePolicy",
)
_RULE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")


def jobset_semantic_checks(js: dict) -> list[str]:
    """The CEL rules of the CRD that need no old object, and the create-time checks of
    JobSet's validating webhook (sigs.k8s.io/jobset pkg/webhooks/jobset_webhook.go),
    applied after its defaulting. Assumes the document already passed the schema."""
    errs: list[str] = []
    name = js["metadata"]["name"]
    spec = js.get("spec") or {}
    rjobs = spec.get("replicatedJobs") or []
    names = [r.get("name") for r in rjobs]

    # CEL on spec: StartupPolicy InOrder and DependsOn are mutually exclusive.
    if (spec.get("startupPolicy") or {}).get("startupPolicyOrder") == "InOrder" and any("dependsOn" in r for r in rjobs):
        errs.append("$.spec: StartupPolicy and DependsOn APIs are mutually exclusive")
    # CEL on volumeClaimPolicies items: templates must not set a namespace.
    for i, pol in enumerate(spec.get("volumeClaimPolicies") or []):
        for j, t in enumerate(pol.get("templates") or []):
            if ((t.get("metadata") or {}).get("namespace") or "") != "":
                errs.append(f"$.spec.volumeClaimPolicies[{i}].templates[{j}].metadata.namespace: must not be set")

    for i, rj in enumerate(rjobs):
        p = f"$.spec.replicatedJobs[{i}]"
        if names.count(rj.get("name")) > 1:
            errs.append(f"{p}.name: duplicate replicatedJob name {rj.get('name')!r}")
        deps = rj.get("dependsOn")
        if deps is not None and i == 0:
            errs.append(f"{p}.dependsOn: DependsOn can't be set for the first ReplicatedJob")
        elif deps:
            if deps[0]["name"] not in names[:i]:
                errs.append(f"{p}.dependsOn[0].name: replicatedJob {rj['name']!r} cannot depend on "
                            f"{deps[0]['name']!r} (must name an earlier replicatedJob)")
        group = rj.get("groupName", "default")
        for e in dns1035_label_errors(group):
            errs.append(f"{p}.groupName: {group!r} {e}")
        replicas = rj.get("replicas", 1)
        job_spec = (rj.get("template") or {}).get("spec") or {}
        parallelism = job_spec.get("parallelism", 1)
        if parallelism * replicas > 2**31 - 1:
            errs.append(f"{p}: the product of replicas and parallelism must not exceed {2**31 - 1}")
        longest_job = f"{name}-{rj['name']}-{replicas - 1}"
        for e in dns1035_label_errors(longest_job):
            errs.append(f"{p}: generated Job name {longest_job!r} {e}")
        # The webhook defaults completionMode to Indexed before validating.
        if job_spec.get("completionMode", "Indexed") == "Indexed" and "completions" in job_spec:
            longest_pod = f"{name}-{rj['name']}-{replicas - 1}-{job_spec['completions'] - 1}-abcde"
            for e in dns1035_label_errors(longest_pod):
                errs.append(f"{p}: generated Pod name {longest_pod!r} {e}")

    network = spec.get("network") or {}
    sub = network.get("subdomain")
    if sub:
        for e in dns1123_subdomain_errors(sub) + dns1035_label_errors(sub):
            errs.append(f"$.spec.network.subdomain: {sub!r} {e}")

    for t in (spec.get("successPolicy") or {}).get("targetReplicatedJobs") or []:
        if t not in names:
            errs.append(f"$.spec.successPolicy.targetReplicatedJobs: {t!r} is not a replicatedJob")

    rules = (spec.get("failurePolicy") or {}).get("rules") or []
    rule_names = [r.get("name") or f"failurePolicyRule{i}" for i, r in enumerate(rules)]  # webhook default
    for i, rule in enumerate(rules):
        p = f"$.spec.failurePolicy.rules[{i}]"
        rn = rule_names[i]
        if len(rn) > 128 or not _RULE_NAME.match(rn):
            errs.append(f"{p}.name: invalid failure policy rule name {rn!r}")
        if rule_names.count(rn) > 1:
            errs.append(f"{p}.name: rule names are not unique ({rn!r})")
        for t in rule.get("targetReplicatedJobs") or []:
            if t not in names:
                errs.append(f"{p}.targetReplicatedJobs: {t!r} is not a replicatedJob")
        for reason in rule.get("onJobFailureReasons") or []:
            if reason not in _VALID_JOB_FAILURE_REASONS:
                errs.append(f"{p}.onJobFailureReasons: {reason!r} is not a recognized job failure reason "
                            f"({', '.join(_VALID_JOB_FAILURE_REASONS)})")

    coord = spec.get("coordinator")
    if coord is not None:
        target = next((r for r in rjobs if r.get("name") == coord.get("replicatedJob")), None)
        if target is None:
            errs.append(f"$.spec.coordinator.replicatedJob: {coord.get('replicatedJob')!r} does not exist")
        else:
            js_spec = (target.get("template") or {}).get("spec") or {}
            if not 0 <= coord.get("jobIndex", 0) < target.get("replicas", 1):
                errs.append("$.spec.coordinator.jobIndex: out of range for the replicatedJob")
            if js_spec.get("completionMode", "Indexed") != "Indexed":
                errs.append("$.spec.coordinator: the coordinator's Job must use Indexed completion mode")
            elif not 0 <= coord.get("podIndex", 0) < js_spec.get("completions", 1):
                errs.append("$.spec.coordinator.podIndex: out of range for the Job's completions")
    return errs


# -------------------------------------------------------------------- driver


def validate_document(doc: Any, k8s_version: str, crd_path: str) -> list[str]:
    if not isinstance(doc, dict):
        return [f"document is a {type(doc).__name__}, not a mapping"]
    errs = common_checks(doc)
    if not (isinstance(doc.get("apiVersion"), str) and isinstance(doc.get("kind"), str)):
        return errs
    crd_validators = load_crd_validators(crd_path)
    validator = crd_validators.get((doc["apiVersion"], doc["kind"]))
    if validator is not None:
        schema_errs = _errors_to_strings(validator.iter_errors(doc))
        errs.extend(schema_errs)
        if not schema_errs and doc["kind"] == "JobSet":
            errs.extend(jobset_semantic_checks(doc))
    elif doc["apiVersion"].startswith("jobset.x-k8s.io/"):
        errs.append(f"Couldn't find schema for kind {doc['kind']} with api version {doc['apiVersion']} "
                    f"in {os.path.basename(crd_path)}")
    else:
        errs.extend(validate_core(doc, k8s_version))
    # de-duplicate, keep order
    return list(dict.fromkeys(errs))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k8s-version", default=DEFAULT_K8S_VERSION,
                    help=f"Kubernetes version of the bundled schemas to use (default {DEFAULT_K8S_VERSION})")
    ap.add_argument("--jobset-crd", default=DEFAULT_CRD, help="JobSet CRD YAML (default: %(default)s)")
    ap.add_argument("--list-k8s-versions", action="store_true", help="print the bundled Kubernetes versions and exit")
    ap.add_argument("paths", nargs="*", metavar="FILE_OR_DIR")
    args = ap.parse_args(argv)

    if args.list_k8s_versions:
        print(" ".join(bundled_k8s_versions()))
        return 0
    if not args.paths:
        ap.error("no FILE_OR_DIR given")

    start = time.monotonic()
    try:
        version, note = resolve_k8s_version(args.k8s_version)
        if note:
            print(f"note: {note}", file=sys.stderr)
        load_crd_validators(os.path.abspath(args.jobset_crd))
        files = expand_inputs(args.paths)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    total = failed = 0
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                docs = [d for d in yaml.load_all(f, Loader=_StrictLoader) if d is not None]
        except (OSError, UnicodeDecodeError) as e:
            print(f"error: cannot read {path}: {e}", file=sys.stderr)
            return 2
        except yaml.YAMLError as e:
            total += 1
            failed += 1
            print(f"FAIL {path}: invalid YAML: {' '.join(str(e).split())}")
            continue
        for doc in docs:
            total += 1
            errs = validate_document(doc, version, os.path.abspath(args.jobset_crd))
            label = doc_label(doc)
            if errs:
                failed += 1
                shown = errs[:MAX_ERRORS_PER_DOC]
                more = f"; ... and {len(errs) - len(shown)} more" if len(errs) > len(shown) else ""
                print(f"FAIL {label}: {'; '.join(shown)}{more}")
            else:
                print(f"ok  {label}")
    if total == 0:
        print("FAIL no documents found in " + " ".join(args.paths))
        return 1
    print(f"{total} document(s), {failed} failed (Kubernetes {version}, "
          f"kubernetes-validate {kubernetes_validate.__version__}, "
          f"{time.monotonic() - start:.2f}s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
