"""Every rendered object checked against the schema of the API that would receive it: built-in kinds
with `kubernetes-validate --strict` at the oldest Kubernetes the chart claims, custom resources
against the CRD schemas vendored in crd-schemas/. A kind with neither fails."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import CI_VALUES, OLDEST_KUBERNETES, ci_values, render

CRD_DIR = Path(__file__).parent / "crd-schemas"
KUBERNETES_VALIDATE = Path(sys.executable).parent / "kubernetes-validate"


def _strict(schema: dict) -> dict:
    """A CRD's structural schema as JSON Schema with the API server's strict field validation:
    fields a schema does not declare are errors unless it preserves unknown fields."""
    schema = copy.deepcopy(schema)

    def visit(node: dict) -> None:
        if not isinstance(node, dict):
            return
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for child in node.get("properties", {}).values():
            visit(child)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                visit(node[key])
        for child in node.get("anyOf", []) + node.get("allOf", []):
            visit(child)

    visit(schema)
    # metadata is an ObjectMeta; the chart sets name, namespace, labels and annotations.
    schema["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
            "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    return schema


def _load_crd_schemas() -> dict[tuple[str, str], dict]:
    schemas = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        assert crd["kind"] == "CustomResourceDefinition", path
        for version in crd["spec"]["versions"]:
            api_version = f"{crd['spec']['group']}/{version['name']}"
            schemas[(api_version, crd["spec"]["names"]["kind"])] = _strict(version["schema"]["openAPIV3Schema"])
    return schemas


CRD_SCHEMAS = _load_crd_schemas()


def validate_custom_resource(obj: dict) -> None:
    """Raises when the object's kind has no vendored schema or does not match it."""
    key = (obj["apiVersion"], obj["kind"])
    if key not in CRD_SCHEMAS:
        raise LookupError(f"no schema for {obj['apiVersion']} {obj['kind']} in {CRD_DIR}")
    jsonschema.Draft202012Validator(CRD_SCHEMAS[key]).validate(obj)


def is_custom(obj: dict) -> bool:
    group = obj["apiVersion"].rpartition("/")[0]
    return any(api.rpartition("/")[0] == group for api, _ in CRD_SCHEMAS)


def kubernetes_validate(objects: list[dict], tmp_path: Path) -> subprocess.CompletedProcess:
    if not KUBERNETES_VALIDATE.exists():
        pytest.fail(f"{KUBERNETES_VALIDATE} missing: kubernetes-validate is in the dev extras")
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump_all(objects))
    return subprocess.run(
        [str(KUBERNETES_VALIDATE), "--strict", "-k", OLDEST_KUBERNETES, str(manifest)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def check_builtins(objects: list[dict], tmp_path: Path) -> None:
    result = kubernetes_validate(objects, tmp_path)
    lines = result.stdout.splitlines()
    # kubernetes-validate only warns about a kind it has no schema for; here that is a failure.
    problems = [line for line in lines if not line.startswith("INFO")]
    assert problems == [], result.stdout + result.stderr
    assert result.returncode == 0, result.stdout + result.stderr
    passed = [line for line in lines if " passed for resource " in line]
    assert len(passed) == len(objects)
    version = ".".join(OLDEST_KUBERNETES.split(".")[:2])
    assert all(line.endswith(f"against version {version}") for line in passed)


@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_every_rendered_object_matches_its_schema(values_file, tmp_path):
    objects = render(ci_values(values_file) if values_file else None)
    builtins = [o for o in objects if not is_custom(o)]
    custom = [o for o in objects if is_custom(o)]
    check_builtins(builtins, tmp_path)
    for obj in custom:
        validate_custom_resource(obj)
    if values_file and values_file.stem == "everything-on-values":
        assert sorted({o["kind"] for o in custom}) == [
            "PodMonitor",
            "PrometheusRule",
            "ScaledObject",
            "TriggerAuthentication",
        ]


# --- the validators themselves catch what they must ---------------------------------------------


def test_kubernetes_validate_rejects_an_unknown_field(rendered_defaults, tmp_path):
    deployment = copy.deepcopy(next(o for o in rendered_defaults if o["kind"] == "Deployment"))
    deployment["spec"]["replicaz"] = 2
    with pytest.raises(AssertionError, match="replicaz"):
        check_builtins([deployment], tmp_path)


def test_kubernetes_validate_refuses_an_api_the_oldest_version_lacks(tmp_path):
    # autoscaling/v2beta2 was removed in 1.26: a chart claiming 1.27 must not render it.
    hpa = {
        "apiVersion": "autoscaling/v2beta2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "x"},
        "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 2},
    }
    with pytest.raises(AssertionError, match="WARN"):
        check_builtins([hpa], tmp_path)


def test_an_unknown_kind_fails(tmp_path):
    unknown_builtin = {"apiVersion": "v1", "kind": "Gizmo", "metadata": {"name": "x"}}
    with pytest.raises(AssertionError, match="Gizmo"):
        check_builtins([unknown_builtin], tmp_path)
    unknown_custom = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "x"},
        "spec": {},
    }
    with pytest.raises(LookupError, match="ServiceMonitor"):
        validate_custom_resource(unknown_custom)


@pytest.mark.parametrize(
    ("kind", "mutate", "message"),
    [
        ("PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][0].update({"fore": "5m"}), "fore"),
        ("PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][0].update({"for": "5 minutes"}), "5 minutes"),
        ("PodMonitor", lambda o: o["spec"]["podMetricsEndpoints"][0].update({"scheme": "ftp"}), "ftp"),
        ("PodMonitor", lambda o: o["spec"].pop("selector"), "selector"),
        ("ScaledObject", lambda o: o["spec"].update({"minReplicaCount": "one"}), "one"),
        ("ScaledObject", lambda o: o["spec"]["triggers"][0].update({"metadata": {"lagCount": 5}}), "5"),
        ("TriggerAuthentication", lambda o: o["spec"]["secretTargetRef"][0].pop("key"), "key"),
    ],
)
def test_crd_schemas_reject_broken_resources(renders, kind, mutate, message):
    obj = copy.deepcopy(next(o for o in renders("everything-on-values") if o["kind"] == kind))
    validate_custom_resource(obj)
    mutate(obj)
    with pytest.raises(jsonschema.ValidationError, match=message):
        validate_custom_resource(obj)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda so: so["spec"]["advanced"]["scalingModifiers"].update({"formula": 1}), "1 is not of type 'string'"),
        (lambda so: so["spec"]["advanced"]["scalingModifiers"].update({"formulas": "lag0"}), "formulas"),
        (lambda so: so["spec"]["advanced"].update({"scalingModifier": {}}), "scalingModifier"),
    ],
)
def test_the_vendored_scaled_object_schema_knows_scaling_modifiers(renders, mutate, message):
    """Sharded streams scale on advanced.scalingModifiers (KEDA >= 2.12): the vendored CRD schema
    has it and refuses a broken one."""
    scaled_object = copy.deepcopy(next(o for o in renders("cluster-shards-values") if o["kind"] == "ScaledObject"))
    assert scaled_object["spec"]["advanced"]["scalingModifiers"]["formula"]
    validate_custom_resource(scaled_object)
    mutate(scaled_object)
    with pytest.raises(jsonschema.ValidationError, match=message):
        validate_custom_resource(scaled_object)
