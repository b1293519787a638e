#!/usr/bin/env python3
"""Offline validation of the Kubernetes manifests under deploy/ (`cargo xtask validate-manifests`).

No API server runs here, so each document is checked the way one would check it, as far as that can
be done offline:

* built-in kinds: kubernetes-validate's schemas, strict (unknown fields are errors), for the oldest
  and the newest Kubernetes version we support;
* our CustomResourceDefinitions: the same, plus the structural-schema rules the API server enforces
  (every node typed, nothing preserving unknown fields, logical junctors without types and only
  over declared fields), identical v1/v1beta1 schemas, and every CEL rule compiled;
* custom resources (the examples' PeerAuthentication, AuthorizationPolicy, VirtualService and
  DestinationRule): the CRD's own
  openAPIV3Schema, with unknown fields rejected as pruning under strict field validation would
  (additionalProperties: false wherever the schema lists properties), plus its CEL rules evaluated
  with cel-python;
* what each kustomization must contain, namespaces on namespaced objects, and read-only verbs in
  the ClusterRole.

Before any of that, a table of good and bad policy documents (policy-cases.yaml) runs through the
CRD check: a bad document that passes, or a good one that fails, stops the run, so the check cannot
pass vacuously. The same table runs through mesh-agent's own parser in
mesh-agent/tests/deploy_examples.rs. The cases and the examples together must also set every field
the CRDs declare, so a field added to a CRD needs a case.

Usage: validate.py --cases FILE BUILD=FILE... (BUILD: deploy, with-istio-crds, examples,
waypoint-example or traffic-example)
"""
import argparse
import copy
import re
import sys
from collections import Counter

import celpy
import jsonschema
import kubernetes_validate.utils as kv
import yaml

# The oldest version the DaemonSet supports (securityContext.appArmorProfile is GA in 1.30) and the
# newest kubernetes-validate ships schemas for.
KUBERNETES_VERSIONS = ["1.30", "1.34"]

CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
}

# What each kustomization must produce (kind: count); nothing else may appear.
AGENT_KINDS = {
    "Namespace": 1,
    "ServiceAccount": 1,
    "ClusterRole": 1,
    "ClusterRoleBinding": 1,
    "Role": 1,
    "RoleBinding": 1,
    "DaemonSet": 1,
}
# The Gateway API v1.4.1 standard channel (deploy/gateway-api): GatewayClass, Gateway, HTTPRoute,
# GRPCRoute, ReferenceGrant, BackendTLSPolicy.
GATEWAY_API_CRDS = 6
EXPECTED_KINDS = {
    # Ours: PeerAuthentication, AuthorizationPolicy, VirtualService, DestinationRule.
    "deploy": {**AGENT_KINDS, "CustomResourceDefinition": 4 + GATEWAY_API_CRDS},
    "with-istio-crds": AGENT_KINDS,
    "examples": {
        "Namespace": 1,
        "ServiceAccount": 2,
        "Deployment": 2,
        "Service": 1,
        "PeerAuthentication": 1,
        "AuthorizationPolicy": 1,
    },
    "waypoint-example": {
        "Gateway": 1,
        "HTTPRoute": 1,
        "ServiceAccount": 2,
        "Deployment": 2,
        "Service": 4,
        "ClusterRole": 1,
        "ClusterRoleBinding": 1,
        "Role": 2,
        "RoleBinding": 2,
    },
    "traffic-example": {
        "VirtualService": 3,
        "DestinationRule": 2,
    },
}
# CRDs we write, whose every field a case or example must set; vendored ones (the Gateway API's)
# are checked the same way otherwise.
OWN_CRD_GROUPS = {"security.istio.io", "networking.istio.io"}

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# metadata of a custom resource as we write them: narrower than ObjectMeta on purpose (these four
# fields are also all that mesh-agent's file-mode parser accepts).
CR_METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS_SUBDOMAIN},
        "namespace": {"type": "string", "maxLength": 63, "pattern": DNS_LABEL},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

JUNCTORS = ("anyOf", "allOf", "oneOf")
# Not allowed inside anyOf/allOf/oneOf/not of a structural schema.
JUNCTOR_BANNED = (
    "type",
    "description",
    "default",
    "additionalProperties",
    "nullable",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-validations",
)

CEL = celpy.Environment()
_compiled = {}


def cel_program(rule):
    if rule not in _compiled:
        _compiled[rule] = CEL.program(CEL.compile(rule))
    return _compiled[rule]


def describe(doc):
    meta = doc.get("metadata") or {}
    name = meta.get("name", "?")
    if meta.get("namespace"):
        name = f"{meta['namespace']}/{name}"
    return f"{doc.get('kind', '?')} {name}"


# ------------------------------------------------------------------------------------------------
# CRDs


def structural_errors(node, path, structural=True):
    """The API server's structural-schema rules (and our own: nothing preserves unknown fields)."""
    errors = []
    if not isinstance(node, dict):
        return [f"{path}: a schema must be an object"]
    if structural:
        if "type" not in node and not node.get("x-kubernetes-int-or-string"):
            errors.append(f"{path}: no type")
        if "properties" in node and "additionalProperties" in node:
            errors.append(f"{path}: both properties and additionalProperties")
    else:
        errors += [f"{path}: {key} inside a logical junctor" for key in JUNCTOR_BANNED if key in node]
    if node.get("x-kubernetes-preserve-unknown-fields"):
        errors.append(f"{path}: preserves unknown fields")
    additional = node.get("additionalProperties")
    if isinstance(additional, bool):
        errors.append(f"{path}: additionalProperties must be a schema")
    if isinstance(node.get("items"), list):
        errors.append(f"{path}: items must be one schema")
    for name, sub in (node.get("properties") or {}).items():
        errors += structural_errors(sub, f"{path}.{name}", structural)
    if isinstance(additional, dict):
        errors += structural_errors(additional, f"{path}[*]", structural)
    if isinstance(node.get("items"), dict):
        errors += structural_errors(node["items"], f"{path}[]", structural)
    for junctor in JUNCTORS:
        for i, branch in enumerate(node.get(junctor) or []):
            errors += structural_errors(branch, f"{path}.{junctor}[{i}]", False)
            if structural:
                errors += declared_outside(branch, node, f"{path}.{junctor}[{i}]")
    if "not" in node:
        errors += structural_errors(node["not"], f"{path}.not", False)
        if structural:
            errors += declared_outside(node["not"], node, f"{path}.not")
    for i, validation in enumerate(node.get("x-kubernetes-validations") or []):
        rule = validation.get("rule", "")
        if "oldSelf" in rule:
            errors.append(f"{path}: transition rule {rule!r} cannot be checked offline")
        try:
            cel_program(rule)
        except Exception as e:  # celpy raises its own error types
            first = (str(e).strip().splitlines() or ["?"])[0]
            errors.append(f"{path}: CEL rule {i} does not compile: {first}")
        if not validation.get("message"):
            errors.append(f"{path}: CEL rule {i} has no message")
    return errors


def declared_outside(branch, structural, path):
    """Every field a junctor branch mentions must be declared in the structural schema beside it."""
    errors = []
    for name, sub in (branch.get("properties") or {}).items():
        declared = (structural.get("properties") or {}).get(name)
        if declared is None:
            errors.append(f"{path}: {name} is not declared outside the junctor")
        else:
            errors += declared_outside(sub, declared, f"{path}.{name}")
    if isinstance(branch.get("items"), dict):
        if not isinstance(structural.get("items"), dict):
            errors.append(f"{path}: items not declared outside the junctor")
        else:
            errors += declared_outside(branch["items"], structural["items"], f"{path}[]")
    for junctor in JUNCTORS:
        for i, sub in enumerate(branch.get(junctor) or []):
            errors += declared_outside(sub, structural, f"{path}.{junctor}[{i}]")
    if "not" in branch:
        errors += declared_outside(branch["not"], structural, f"{path}.not")
    return errors


def strict_schema(schema):
    """The schema as strict field validation applies it: unknown fields are errors."""
    schema = copy.deepcopy(schema)

    def fix(node, structural):
        if not isinstance(node, dict):
            return
        if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
            node["type"] = ["integer", "string"]
        if (
            structural
            and node.get("type") == "object"
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for sub in (node.get("properties") or {}).values():
            fix(sub, structural)
        if isinstance(node.get("additionalProperties"), dict):
            fix(node["additionalProperties"], structural)
        if isinstance(node.get("items"), dict):
            fix(node["items"], structural)
        for junctor in JUNCTORS:
            for branch in node.get(junctor) or []:
                fix(branch, False)
        if "not" in node:
            fix(node["not"], False)

    schema.setdefault("properties", {})["metadata"] = copy.deepcopy(CR_METADATA)
    fix(schema, True)
    return schema


def schema_paths(node, path=""):
    """Every field path the structural part of a schema declares (maps as `*`, lists as `[]`)."""
    paths = set()
    for name, sub in (node.get("properties") or {}).items():
        paths.add(f"{path}.{name}")
        paths |= schema_paths(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        paths.add(f"{path}.*")
        paths |= schema_paths(node["additionalProperties"], f"{path}.*")
    if isinstance(node.get("items"), dict):
        paths |= schema_paths(node["items"], f"{path}[]")
    return paths


def value_paths(value, schema, path=""):
    """The declared field paths `value` sets, named as schema_paths names them."""
    paths = set()
    if isinstance(value, dict) and isinstance(schema, dict):
        properties = schema.get("properties") or {}
        for name, sub in value.items():
            if name in properties:
                paths.add(f"{path}.{name}")
                paths |= value_paths(sub, properties[name], f"{path}.{name}")
            elif isinstance(schema.get("additionalProperties"), dict):
                paths.add(f"{path}.*")
                paths |= value_paths(sub, schema["additionalProperties"], f"{path}.*")
    elif isinstance(value, list) and isinstance(schema, dict) and isinstance(schema.get("items"), dict):
        for item in value:
            paths |= value_paths(item, schema["items"], f"{path}[]")
    return paths


def with_defaults(value, schema):
    """`value` with the schema's `default`s filled in where a field is absent, as the API server
    does before it validates (CEL rules read defaulted fields, e.g. a backendRef's `kind`)."""
    if isinstance(value, dict) and isinstance(schema, dict):
        properties = schema.get("properties") or {}
        out = {}
        for name, sub in properties.items():
            if name not in value and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
        for name, sub in value.items():
            if name in properties:
                out[name] = with_defaults(sub, properties[name])
            elif isinstance(schema.get("additionalProperties"), dict):
                out[name] = with_defaults(sub, schema["additionalProperties"])
            else:
                out[name] = sub
        # A default may itself hold objects with defaults.
        for name in properties:
            if name in out and name not in value:
                out[name] = with_defaults(out[name], properties[name])
        return out
    if isinstance(value, list) and isinstance(schema, dict) and isinstance(schema.get("items"), dict):
        return [with_defaults(item, schema["items"]) for item in value]
    return value


def cel_errors(schema, value, path):
    """Evaluates the x-kubernetes-validations along `value`, as the API server does on a create
    (transition rules, which read `oldSelf`, only run on updates)."""
    errors = []
    for validation in schema.get("x-kubernetes-validations") or []:
        if "oldSelf" in validation["rule"]:
            continue
        try:
            result = cel_program(validation["rule"]).evaluate({"self": celpy.json_to_cel(value)})
            ok = isinstance(result, celpy.celtypes.BoolType) and bool(result)
        except Exception:  # an evaluation error (int("http"), say) fails the rule, as in Kubernetes
            ok, validation = False, {**validation, "message": f"{validation['message']} (evaluation error)"}
        if not ok:
            errors.append(f"{path}: {validation['message']}")
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for name, sub in value.items():
            if name in properties:
                errors += cel_errors(properties[name], sub, f"{path}.{name}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += cel_errors(schema["additionalProperties"], sub, f"{path}[{name}]")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += cel_errors(schema["items"], item, f"{path}[{i}]")
    return errors


class Crd:
    def __init__(self, doc):
        spec = doc["spec"]
        self.name = doc["metadata"]["name"]
        self.group = spec["group"]
        self.kind = spec["names"]["kind"]
        self.namespaced = spec["scope"] == "Namespaced"
        self.schemas = {
            v["name"]: v["schema"]["openAPIV3Schema"] for v in spec["versions"] if v.get("served")
        }
        self.strict = {version: strict_schema(s) for version, s in self.schemas.items()}

    @staticmethod
    def lint(doc):
        """What the API server (or our own rules) would refuse in the CRD itself."""
        errors = []
        spec = doc.get("spec", {})
        names = spec.get("names", {})
        if doc["metadata"]["name"] != f"{names.get('plural')}.{spec.get('group')}":
            errors.append("metadata.name must be <plural>.<group>")
        versions = spec.get("versions", [])
        if sum(1 for v in versions if v.get("storage")) != 1:
            errors.append("exactly one version must be the storage version")
        schemas = []
        for v in versions:
            schema = (v.get("schema") or {}).get("openAPIV3Schema")
            if schema is None:
                errors.append(f"version {v.get('name')}: no openAPIV3Schema")
                continue
            schemas.append(schema)
            where = f"version {v['name']}: openAPIV3Schema"
            errors += structural_errors(schema, where)
            if schema.get("type") != "object":
                errors.append(f"{where}: the root must be an object")
            metadata = (schema.get("properties") or {}).get("metadata")
            if metadata is not None and set(metadata) - {"type"}:
                errors.append(f"{where}.metadata: only `type: object` may be given")
            spec_schema = (schema.get("properties") or {}).get("spec")
            if not spec_schema:
                errors.append(f"{where}.spec: missing")
        if any(s != schemas[0] for s in schemas[1:]):
            errors.append("the served versions' schemas differ (they must stay identical)")
        if spec.get("group") not in OWN_CRD_GROUPS:
            # Vendored CRDs may use transition rules: the API server runs them on updates only,
            # and there are no updates offline.
            errors = [e for e in errors if "transition rule" not in e]
        return errors

    def validate(self, doc):
        """Errors the API server would answer for this custom resource (empty: accepted)."""
        group, _, version = str(doc.get("apiVersion", "")).partition("/")
        if group != self.group or version not in self.schemas:
            served = ", ".join(f"{self.group}/{v}" for v in self.schemas)
            return [f"apiVersion {doc.get('apiVersion')!r} is not served (expected {served})"]
        if doc.get("kind") != self.kind:
            return [f"kind {doc.get('kind')!r} is not {self.kind}"]
        if self.namespaced and not (doc.get("metadata") or {}).get("namespace"):
            return ["metadata.namespace: missing (it would land in the namespace of the kubeconfig)"]
        doc = with_defaults(doc, self.schemas[version])
        validator = jsonschema.Draft202012Validator(self.strict[version])
        errors = [
            f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
        ]
        if errors:
            return errors
        return cel_errors(self.schemas[version], doc, "")


# ------------------------------------------------------------------------------------------------


def kubernetes_errors(doc):
    """kubernetes-validate, strict, for every version we support."""
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "<root>"
            errors.append(f"kubernetes {version}: {path}: {e.message}")
        except kv.SchemaNotFoundError as e:
            errors.append(f"kubernetes {version}: {e.message}")
    return errors


def policy_errors(doc):
    """Project rules beyond schemas."""
    errors = []
    kind = doc.get("kind")
    if kind not in CLUSTER_SCOPED and not (doc.get("metadata") or {}).get("namespace"):
        errors.append("metadata.namespace: missing (it would land in the kubeconfig's namespace)")
    if kind == "ClusterRole":
        for rule in doc.get("rules") or []:
            extra = set(rule.get("verbs") or []) - {"list", "watch"}
            if extra:
                errors.append(f"ClusterRole grants {sorted(extra)}: only list and watch are allowed")
    return errors


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def self_test(cases, crds):
    """The negative and positive table: proves the CRD check rejects what it must."""
    failures, covered = [], {}
    for case in cases:
        doc, expect = case["doc"], case["schema"]
        crd = crds.get((str(doc.get("apiVersion", "")).split("/")[0], doc.get("kind")))
        if crd is None:
            failures.append(f"case {case['name']!r}: no CRD for {doc.get('apiVersion')} {doc.get('kind')}")
            continue
        errors = crd.validate(doc)
        if expect == "accept":
            if errors:
                failures.append(f"case {case['name']!r}: expected accepted, got: {'; '.join(errors)}")
            version = doc["apiVersion"].split("/")[1]
            covered.setdefault(crd.name, set()).update(value_paths(doc, crd.schemas[version]))
        elif expect == "reject":
            if not errors:
                failures.append(f"case {case['name']!r}: expected rejected, but it passed")
            elif case.get("schemaError") and not any(case["schemaError"] in e for e in errors):
                failures.append(
                    f"case {case['name']!r}: rejected, but not for {case['schemaError']!r}: "
                    + "; ".join(errors)
                )
        else:
            failures.append(f"case {case['name']!r}: schema must be accept or reject")
    return failures, covered


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", required=True, help="policy-cases.yaml")
    parser.add_argument("builds", nargs="+", metavar="BUILD=FILE")
    args = parser.parse_args()

    builds = {}
    for item in args.builds:
        name, _, path = item.partition("=")
        if name not in EXPECTED_KINDS or not path:
            parser.error(f"{item!r}: expected one of {', '.join(EXPECTED_KINDS)} = FILE")
        builds[name] = load(path)
    passed, failed = 0, 0

    def report(build, doc, errors, what):
        nonlocal passed, failed
        if errors:
            failed += 1
            print(f"FAIL {build}: {describe(doc)}")
            for e in errors:
                print(f"       {e}")
        else:
            passed += 1
            print(f"ok   {build}: {describe(doc)} ({what})")

    # The CRDs first: every build's custom resources are checked against them (a CRD that fails its
    # own checks is reported below, and still used, so its resources are checked too).
    crds = {}
    for build, docs in builds.items():
        for doc in docs:
            if doc.get("kind") == "CustomResourceDefinition":
                try:
                    crd = Crd(doc)
                except (KeyError, TypeError, AttributeError):
                    continue
                crds[(crd.group, crd.kind)] = crd
    if not crds:
        print("FAIL no CustomResourceDefinition among the builds: nothing to check policies against")
        return 1

    with open(args.cases) as f:
        cases = yaml.safe_load(f)["cases"]
    failures, covered = self_test(cases, crds)
    for failure in failures:
        print(f"FAIL self-test: {failure}")
    failed += len(failures)
    print(f"{'ok  ' if not failures else 'FAIL'} self-test: {len(cases)} policy cases, "
          f"{len(failures)} not as expected")

    for build, docs in builds.items():
        kinds = Counter(d.get("kind") for d in docs)
        if kinds != Counter(EXPECTED_KINDS[build]):
            failed += 1
            print(f"FAIL {build}: kinds {dict(kinds)}, expected {EXPECTED_KINDS[build]}")
        for doc in docs:
            if doc.get("kind") == "CustomResourceDefinition":
                errors = Crd.lint(doc) + kubernetes_errors(doc)
                report(build, doc, errors, "structural schema, kubernetes " + ", ".join(KUBERNETES_VERSIONS))
                continue
            crd = crds.get((str(doc.get("apiVersion", "")).split("/")[0], doc.get("kind")))
            if crd is not None:
                errors = crd.validate(doc) + policy_errors(doc)
                if not errors:
                    version = doc["apiVersion"].split("/")[1]
                    covered.setdefault(crd.name, set()).update(value_paths(doc, crd.schemas[version]))
                report(build, doc, errors, f"schema of {crd.name}")
            else:
                errors = kubernetes_errors(doc) + policy_errors(doc)
                report(build, doc, errors, "kubernetes " + ", ".join(KUBERNETES_VERSIONS) + ", strict")

    # Every field a CRD of ours declares is exercised by an accepted document.
    for crd in crds.values():
        if crd.group not in OWN_CRD_GROUPS:
            continue
        for version, schema in crd.schemas.items():
            missing = schema_paths(schema["properties"]["spec"], ".spec") - covered.get(crd.name, set())
            if missing:
                failed += 1
                print(f"FAIL {crd.name} {version}: no accepted case sets {', '.join(sorted(missing))}")

    print(f"manifests: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
