"""Charts render with the real Helm engine, lint clean in strict mode, and every object they
produce is valid Kubernetes (OpenAPI schemas, offline) or valid against Ambit's CRDs."""

from __future__ import annotations

import json
import pathlib
import re

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import CASE_IDS, CASES, CHARTS, CHARTS_DIR, NAMESPACE, REPO, crds, render

# The oldest Kubernetes the charts support (projected tokens, hostPath types, appProtocol: all
# older) and the newest whose schemas kubernetes-validate ships.
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version() + ".0"]


@pytest.mark.parametrize("chart", CHARTS)
def test_lint_strict_default_values(chart):
    report = helm.lint(
        str(CHARTS_DIR / chart), strict=True, namespace=NAMESPACE, kube_version="v1.30.0"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, f"helm lint --strict {chart}: {problems}"


@pytest.mark.parametrize(("chart", "values"), CASES, ids=CASE_IDS)
def test_lint_strict_example_values(chart, values):
    r = render(chart, values)
    report = helm.lint(str(CHARTS_DIR / chart), r.values, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, f"helm lint --strict {chart} -f {values}: {problems}"


@pytest.mark.parametrize(("chart", "values"), CASES, ids=CASE_IDS)
def test_rendered_objects_are_valid_kubernetes(chart, values):
    r = render(chart, values)
    builtin = [o for o in r.objects if o["apiVersion"].split("/")[0] in BUILTIN_GROUPS]
    for obj in builtin:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(
                    f"{chart} {obj['kind']} {obj['metadata']['name']} invalid for Kubernetes "
                    f"{version}: {e.message} at {'.'.join(map(str, e.path))}"
                )
    custom = [o for o in r.objects if o not in builtin]
    for obj in custom:
        validate_custom(obj)
    # Every namespaced object lands in the release's namespace.
    for obj in r.objects:
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]


BUILTIN_GROUPS = {"v1", "apps", "rbac.authorization.k8s.io", "apiextensions.k8s.io"}
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "GatewayClass", "CustomResourceDefinition"}


def crd_for(api_version: str, kind: str) -> tuple[dict, dict]:
    group, version = api_version.split("/")
    for crd in crds():
        if crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind:
            for v in crd["spec"]["versions"]:
                if v["name"] == version and v["served"]:
                    return crd, v["schema"]["openAPIV3Schema"]
    raise AssertionError(f"no CRD of ambit-base serves {kind} {api_version}")


def validate_custom(obj: dict) -> None:
    _, schema = crd_for(obj["apiVersion"], obj["kind"])
    try:
        jsonschema.validate(obj, schema)
    except jsonschema.ValidationError as e:
        raise AssertionError(
            f"{obj['kind']} {obj['metadata'].get('name')}: {e.message} at "
            f"{'.'.join(map(str, e.path))}"
        ) from None


def test_crds_are_valid_kubernetes_and_cover_every_kind_ambit_reads():
    names = set()
    for crd in crds():
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(crd, version, strict=True)
        spec = crd["spec"]
        assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
        assert [v["name"] for v in spec["versions"] if v["storage"]].__len__() == 1, crd["metadata"]
        for v in spec["versions"]:
            schema = v["schema"]["openAPIV3Schema"]
            jsonschema.Draft7Validator.check_schema(schema)
            assert_structural(schema, crd["metadata"]["name"])
            # Controllers write status through the status subresource.
            assert v.get("subresources", {}).get("status") == {}, crd["metadata"]["name"]
        names.add((spec["group"], spec["names"]["plural"]))
    # What istiod-lite's Kubernetes source watches, beyond the built-in kinds.
    from test_binaries import watched_kinds

    custom = {(g, p) for g, p in watched_kinds() if "." in g and not g.endswith("k8s.io")
              or g == "gateway.networking.k8s.io"}
    assert custom == names


def assert_structural(schema: dict, where: str) -> None:
    """Kubernetes' structural schema rules: every node has a type (or preserves unknown fields
    with an object type), no $ref or additionalProperties beside properties."""
    assert "type" in schema, f"{where}: a schema node without type"
    assert "$ref" not in schema, where
    assert not ("additionalProperties" in schema and "properties" in schema), where
    for key, sub in schema.get("properties", {}).items():
        assert_structural(sub, f"{where}.{key}")
    if isinstance(schema.get("items"), dict):
        assert_structural(schema["items"], f"{where}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        assert_structural(schema["additionalProperties"], f"{where}{{}}")


def yaml_examples_in_docs() -> list[tuple[str, dict]]:
    """The Istio and Gateway API objects written in the docs' YAML blocks and the lab's demo."""
    kinds = {c["spec"]["names"]["kind"] for c in crds()}
    found = []
    sources = [(md, re.findall(r"```ya?ml\n(.*?)```", md.read_text(), re.S))
               for md in sorted((REPO / "docs").rglob("*.md")) + [REPO / "README.md"]]
    demo = REPO / "ambitctl/src/lab/demo.rs"
    sources.append((demo, re.findall(r'OBJECTS: &str = r#"(.*?)"#;', demo.read_text(), re.S)))
    for md, blocks in sources:
        for block in blocks:
            try:
                docs = list(yaml.safe_load_all(block))
            except yaml.YAMLError:
                continue
            for d in docs:
                if isinstance(d, dict) and d.get("kind") in kinds and "apiVersion" in d:
                    found.append((f"{md.relative_to(REPO)}: {d['kind']} "
                                  f"{d.get('metadata', {}).get('name')}", d))
    return found


def test_objects_in_the_docs_are_accepted_by_the_crds():
    examples = yaml_examples_in_docs()
    kinds = {obj["kind"] for _, obj in examples}
    assert {"Gateway", "HTTPRoute", "AuthorizationPolicy"} <= kinds, "the examples were not found"
    for where, obj in examples:
        try:
            validate_custom(obj)
        except AssertionError as e:
            pytest.fail(f"{where}: {e}")


def test_crd_schemas_refuse_what_ambit_cannot_read():
    gateway = {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "demo"},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    }
    validate_custom(gateway)
    bad = json.loads(json.dumps(gateway))
    bad["spec"]["listeners"][0]["port"] = "15008"
    with pytest.raises(AssertionError, match="spec.listeners.0.port"):
        validate_custom(bad)
    policy = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "x", "namespace": "demo"}, "spec": {"action": "Audit"}}
    with pytest.raises(AssertionError, match="spec.action"):
        validate_custom(policy)


def test_the_gatewayclass_is_the_waypoint_class():
    gc = render("ambit-base", None).one("GatewayClass", "istio-waypoint")
    assert gc["spec"]["controllerName"] == "istio.io/mesh-controller"


@pytest.mark.parametrize("chart", CHARTS)
def test_every_value_is_documented_and_typed(chart):
    """Each key of values.yaml has a comment above it and a type in values.schema.json."""
    text = (CHARTS_DIR / chart / "values.yaml").read_text()
    values = yaml.safe_load(text)
    schema = json.loads((CHARTS_DIR / chart / "values.schema.json").read_text())
    lines = text.splitlines()

    def walk(node, sch, path, start):
        for key, value in node.items():
            where = ".".join(path + [key])
            props = sch.get("properties", {})
            assert key in props, f"{chart}: {where} is not in values.schema.json"
            sub = props[key]
            assert "type" in sub and sub.get("description"), f"{chart}: {where} untyped/undescribed"
            indent = "  " * len(path)
            idx = next(i for i in range(start, len(lines)) if lines[i].startswith(f"{indent}{key}:"))
            # A setting (not a section heading) has its documentation right above it.
            if not (isinstance(value, dict) and value):
                assert lines[idx - 1].strip().startswith("#"), f"{chart}: {where} has no comment"
            if isinstance(value, dict) and sub.get("properties"):
                walk(value, sub, path + [key], idx + 1)

    walk(values, schema, [], 0)


@pytest.mark.parametrize(
    ("chart", "values", "error"),
    [
        ("ztunnel", {"logAsJson": "yes"}, "logAsJson"),
        ("ztunnel", {"secretTTL": "one day"}, "secretTTL"),
        ("ztunnel", {"terminationGracePeriodSeconds": 3}, "terminationGracePeriodSeconds"),
        ("cni", {"cniBinDir": "opt/cni/bin"}, "cniBinDir"),
        ("istiod-lite", {"pilot": {"replicaCount": 0}}, "replicaCount"),
        ("istiod-lite", {"pilot": {"replicas": 2}}, "replicas"),
        ("ambit-base", {"gatewayClass": {"enabled": "no"}}, "enabled"),
    ],
)
def test_schema_refuses_bad_values(chart, values, error):
    from conftest import load_chart

    with pytest.raises(helm.HelmValuesError, match=error):
        load_chart(chart).render(values, name=chart, namespace=NAMESPACE)


def test_images_follow_global_hub_and_tag():
    values = {"global": {"hub": "r.example/a", "tag": "9.9"}}
    from conftest import load_chart

    seen = {}
    for chart in ["istiod-lite", "cni", "ztunnel"]:
        manifests = load_chart(chart).render(values, name=chart, namespace=NAMESPACE)
        for text in manifests.values():
            seen[chart] = seen.get(chart, []) + re.findall(r"r\.example/a/[a-z-]+:9\.9", text)
    assert set(seen["istiod-lite"]) == {"r.example/a/istiod-lite:9.9", "r.example/a/waypoint:9.9"}
    assert set(seen["cni"]) == {"r.example/a/cni:9.9"}
    assert set(seen["ztunnel"]) == {"r.example/a/ztunnel:9.9"}
