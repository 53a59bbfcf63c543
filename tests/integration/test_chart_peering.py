"""charts/tuneop with `replicas` > 1 (kopf peering), rendered by real Helm like tests/contract/test_chart.py:
what the operator pods get (--peering, POD_ID, a rolling update that never runs more than `replicas`
pods), kopf's peering CRDs, and the peering RBAC (the verbs test_operator_peering.py records). With
replicas: 1 nothing of it is rendered."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the test extra) renders the chart")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

CHART = Path(__file__).resolve().parents[2] / "charts" / "tuneop"
RELEASE, NAMESPACE = "tuneop", "tuneop-system"
# What kopf (list, watch: its peering watch; patch: keep-alives) and tuneop (create, when missing) do
# with the peering object: recorded in test_operator_peering.py.
PEERING_VERBS = {"list", "watch", "patch", "create"}


def render(values: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    out = helm.Chart.load(str(CHART)).render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [doc for path, text in sorted(out.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]


def kopf_rules(role: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in role["rules"] if "kopf.dev" in r.get("apiGroups", [])]


def test_one_replica_renders_no_peering():
    for values in ({}, {"replicas": 1}, {"replicas": 1, "watchNamespaces": ["team-a"]}):
        docs = render(values)
        dep = by_kind(docs, "Deployment")[0]
        assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
        c = container(docs)
        assert not [a for a in c["args"] if a.startswith("--peering")]
        assert "POD_ID" not in {e["name"] for e in c["env"]}
        assert by_kind(docs, "CustomResourceDefinition") == []
        assert all(kopf_rules(r) == [] for r in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"))
    assert render({}) == render({"replicas": 1})


@pytest.mark.parametrize("namespaces", [[], ["team-a", "team-b"]], ids=["cluster-wide", "namespaced"])
def test_replicas_peer_through_kopf(namespaces):
    from tuneop.cli import build_parser

    docs = render({"replicas": 2, "watchNamespaces": namespaces})
    for d in docs:
        kubernetes_validate.validate(d, kubernetes_validate.latest_version(), strict=True)
    dep = by_kind(docs, "Deployment")[0]
    assert dep["spec"]["replicas"] == 2
    # never more pods than replicas (no surge), one replaced at a time
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    c = container(docs)
    args = build_parser().parse_args(["operator", *c["args"]])
    # no --priority: each replica's default (the oldest acts), distinct across the replicas
    assert args.peering == "tuneop" and args.priority is None
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}  # kopf's identity

    crds = {d["metadata"]["name"]: d for d in by_kind(docs, "CustomResourceDefinition")}
    assert set(crds) == {"kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"}
    assert crds["kopfpeerings.kopf.dev"]["spec"]["scope"] == "Namespaced"
    assert crds["kopfpeerings.kopf.dev"]["spec"]["names"]["kind"] == "KopfPeering"
    assert crds["clusterkopfpeerings.kopf.dev"]["spec"]["scope"] == "Cluster"
    for crd in crds.values():
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        (version,) = crd["spec"]["versions"]
        assert version["name"] == "v1" and version["served"] and version["storage"]
        assert "subresources" not in version  # kopf patches the status with the object itself

    if namespaces:
        roles = by_kind(docs, "Role")
        assert sorted(r["metadata"]["namespace"] for r in roles) == namespaces
        resource = "kopfpeerings"
    else:
        roles = [r for r in by_kind(docs, "ClusterRole") if r["metadata"]["name"] == RELEASE]
        resource = "clusterkopfpeerings"
    for role in roles:
        (rule,) = kopf_rules(role)
        assert rule["resources"] == [resource] and set(rule["verbs"]) == PEERING_VERBS


def test_crds_can_be_left_to_another_release():
    docs = render({"replicas": 2, "peering": {"installCRDs": False, "name": "ml-operators"}})
    assert by_kind(docs, "CustomResourceDefinition") == []
    assert "--peering=ml-operators" in container(docs)["args"]


@pytest.mark.parametrize("bad", [{"replicas": 0}, {"replicas": "2"}, {"peering": {"nme": "x"}},
                                 {"peering": {"name": "Not_A_Name"}}])
def test_values_schema_rejects_bad_replicas_and_peering(bad):
    with pytest.raises(helm.HelmError):
        render(bad)
