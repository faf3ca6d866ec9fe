"""Shared fixtures of the chart tests: the charts rendered by the real Helm engine, once each.

Every chart is rendered for its default values and for each file under charts/<chart>/examples/.
"""

from __future__ import annotations

import functools
import os
import pathlib
from dataclasses import dataclass, field

import helm_python as helm
import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CHARTS_DIR = REPO / "charts"
CHARTS = ["ambit-base", "istiod-lite", "cni", "ztunnel"]
NAMESPACE = "istio-system"


def bin_dir() -> pathlib.Path:
    """Where the debug binaries are (`cargo build --workspace --bins`)."""
    if os.environ.get("AMBIT_BIN_DIR"):
        return pathlib.Path(os.environ["AMBIT_BIN_DIR"])
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "debug"


def binary(name: str) -> pathlib.Path:
    path = bin_dir() / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: build it first (cargo build --workspace --bins)")
    return path


def value_files(chart: str) -> list[str | None]:
    """None (the defaults) and every example values file of `chart`."""
    return [None] + sorted(str(p) for p in (CHARTS_DIR / chart / "examples").glob("*.yaml"))


def case_id(chart: str, values: str | None) -> str:
    return f"{chart}:{pathlib.Path(values).stem if values else 'default'}"


CASES = [(c, v) for c in CHARTS for v in value_files(c)]
CASE_IDS = [case_id(c, v) for c, v in CASES]


@dataclass
class Rendered:
    chart: str
    values_file: str | None
    values: dict
    objects: list[dict] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [o for o in self.of_kind(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.chart}: expected one {kind} {name or ''}, got {len(found)}"
        return found[0]


@functools.cache
def load_chart(chart: str) -> helm.Chart:
    return helm.Chart.load(str(CHARTS_DIR / chart))


@functools.cache
def render(chart: str, values_file: str | None) -> Rendered:
    values = yaml.safe_load(pathlib.Path(values_file).read_text()) if values_file else {}
    manifests = load_chart(chart).render(
        values, name=chart, namespace=NAMESPACE, is_install=True
    )
    out = Rendered(chart, values_file, values)
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.objects.append(doc)
    return out


def crds() -> list[dict]:
    """The CRDs of ambit-base (Helm installs crds/ as they are, not rendered)."""
    return list(_crd_docs())


@functools.cache
def _crd_docs() -> tuple:
    docs = []
    for path in sorted((CHARTS_DIR / "ambit-base" / "crds").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return tuple(docs)


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def container(obj: dict, name: str) -> dict:
    spec = pod_spec(obj)
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        if c["name"] == name:
            return c
    raise AssertionError(f"{obj['kind']} {obj['metadata']['name']} has no container {name}")
