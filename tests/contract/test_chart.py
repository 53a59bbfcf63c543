"""charts/tuneop rendered by real Helm (helm-python-sdk embeds Helm v4; no helm binary).

- the chart's CRDs are the generated ones (crds/);
- every rendered object passes the Kubernetes schemas (kubernetes-validate, strict); the
  prometheus-operator kinds are checked for their shape;
- the operator's RBAC covers every API call the handlers make (recorded from real operator runs
  against kmock, both backends), grants nothing they never use (beyond a documented list), and
  Secrets are read-only;
- the operator pod and every pod tuneop creates pass Pod Security "restricted" (podsecurity.py);
- the dashboard and the alert rules only use metrics the operator (or vLLM) exports.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import kubernetes_validate
import pytest
import yaml
from podsecurity import pod_spec_of, restricted_violations

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the test extra) renders the chart")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tuneop"
K8S_VERSION = kubernetes_validate.latest_version()
RELEASE, NAMESPACE = "tuneop", "tuneop-system"

ALL_ON = {
    "metrics": {"serviceMonitor": {"enabled": True}, "vllmPodMonitor": {"enabled": True}},
    "prometheusRule": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
}
NAMESPACED = {**ALL_ON, "watchNamespaces": ["team-a", "team-b"]}
NETPOL = {**NAMESPACED, "networkPolicy": {"enabled": True}}


def render(values: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    chart = helm.Chart.load(str(CHART))
    out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {}).setdefault("namespace", None)
                docs.append(doc)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


# ---------------------------------------------------------------------------------- chart basics


def test_chart_crds_are_the_generated_crds():
    shipped = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert shipped == sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    for name in shipped:
        assert (CHART / "crds" / name).read_text() == (ROOT / "crds" / name).read_text(), (
            f"charts/tuneop/crds/{name} drifted from crds/{name}: cp crds/*.yaml charts/tuneop/crds/"
        )
    assert len(helm.Chart.load(str(CHART)).crds) == len(shipped)  # Helm sees them as CRDs


def test_helm_lint_is_clean():
    for values in ({}, ALL_ON, NAMESPACED):
        report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert problems == [] and report["errors"] == [], report


@pytest.mark.parametrize("values", [{}, ALL_ON, NAMESPACED, NETPOL],
                         ids=["defaults", "all-on", "namespaced", "network-policies"])
def test_rendered_objects_validate_strictly(values):
    docs = render(values)
    kinds = {d["kind"] for d in docs}
    assert {"ServiceAccount", "Deployment", "Service"} <= kinds
    for d in docs:
        if d["apiVersion"].startswith("monitoring.coreos.com/"):
            assert d["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule")
            assert d["metadata"]["name"] and isinstance(d["spec"], dict)
            continue
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def test_network_policies_let_only_the_operator_and_allowed_peers_reach_vllm_pods():
    from tuneop.adapterdeployment import builders as b

    assert by_kind(render(NAMESPACED), "NetworkPolicy") == []  # off by default
    docs = render(NETPOL)
    pols = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in by_kind(docs, "NetworkPolicy")}
    assert set(pols) == {(NAMESPACE, RELEASE), ("team-a", f"{RELEASE}-vllm"), ("team-b", f"{RELEASE}-vllm")}
    operator_labels = by_kind(docs, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    assert _matches(pols[(NAMESPACE, RELEASE)]["spec"]["podSelector"], operator_labels)
    pod = b.build_pod_template({"metadata": {"name": "qwen", "namespace": "team-a", "uid": "u"},
                                "spec": {"baseModel": "m"}})
    for ns in ("team-a", "team-b"):
        spec = pols[(ns, f"{RELEASE}-vllm")]["spec"]
        assert _matches(spec["podSelector"], pod["metadata"]["labels"])
        (rule,) = spec["ingress"]
        assert rule["ports"] == [{"port": b.CONTAINER_PORT, "protocol": "TCP"}]
        first = rule["from"][0]
        assert first["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": NAMESPACE}
        assert _matches(first["podSelector"], operator_labels)
        assert rule["from"][1:] == [{"podSelector": {}}]
    # Only the listed peers: an empty allowFrom leaves the operator alone.
    only_op = render({**NETPOL, "networkPolicy": {"enabled": True, "vllm": {"allowFrom": [],
                                                                             "namespaces": ["ml"]}}})
    (vpol,) = [p for p in by_kind(only_op, "NetworkPolicy") if p["metadata"]["name"].endswith("-vllm")]
    assert vpol["metadata"]["namespace"] == "ml" and len(vpol["spec"]["ingress"][0]["from"]) == 1


def test_operator_deployment():
    dep = by_kind(render(), "Deployment")[0]
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    c = spec["template"]["spec"]["containers"][0]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert f"--liveness-port={ports['healthz']}" in c["args"]
    assert f"--metrics-port={ports['http-metrics']}" in c["args"]
    assert "--all-namespaces" in c["args"]
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert f"--trainer-image={env['TUNEOP_TRAINER_IMAGE']}" in c["args"]
    # no vLLM image set: the operator's own default (adapterdeployment/vllm.py, the release its guard is tested with)
    assert "TUNEOP_VLLM_IMAGE" not in env
    # The metrics Service selects the operator pod.
    svc = by_kind(render(), "Service")[0]
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"][0]["targetPort"] == "http-metrics"


def operator_roles(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The operator's own (Cluster)Roles, not the aggregated ones for people."""
    return [d for d in by_kind(docs, kind) if "rbac.authorization.k8s.io/aggregate-to-view" not in d["metadata"]["labels"]
            and "rbac.authorization.k8s.io/aggregate-to-edit" not in d["metadata"]["labels"]]


def test_namespaced_mode_uses_roles_only():
    docs = render(NAMESPACED)
    # The operator gets no cluster-scoped permission (the aggregated user roles bind nothing).
    assert operator_roles(docs, "ClusterRole") == [] and by_kind(docs, "ClusterRoleBinding") == []
    assert by_kind(render({**NAMESPACED, "rbac": {"aggregateToDefaultRoles": False}}), "ClusterRole") == []
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in by_kind(docs, "RoleBinding")) == ["team-a", "team-b"]
    args = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args
    pm = by_kind(docs, "PodMonitor")[0]
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_values_reach_the_pod():
    docs = render({"nodeSelector": {"pool": "system"}, "image": {"tag": "9.9.9"},
                   "workloads": {"trainer": {"image": "reg/trainer:1"}, "vllm": {"image": "reg/vllm:2"}}})
    pod = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["nodeSelector"] == {"pool": "system"}
    assert c["image"].endswith(":9.9.9")
    assert "--trainer-image=reg/trainer:1" in c["args"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["TUNEOP_VLLM_IMAGE"] == "reg/vllm:2"


# ---------------------------------------------------------------------------------- RBAC


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    out = set()
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        for g in rule.get("apiGroups", []):
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    out.add((g, r, v))
    return out


# Granted although the recorded scenarios do not exercise them, each for a reason.
NOT_RECORDED = {
    # kopf watches CRDs at runtime when it may (cluster-wide mode; the kmock runs disable scanning).
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> set[tuple[str, str, str]]:
    """Every (group, resource, verb) the operator used in the scenarios, both backends."""
    import rbac_scenarios as rs

    from kmockenv import KMockThread
    from tuneop import kube

    out: set[tuple[str, str, str]] = set()
    mp = pytest.MonkeyPatch()
    try:
        for scenario in ("kubernetes", "together", "adapterdeployment"):
            server = KMockThread().start()
            tmp = tmp_path_factory.mktemp(scenario)
            kubeconfig = tmp / "kubeconfig"
            kubeconfig.write_text(json.dumps({
                "apiVersion": "v1", "kind": "Config",
                "clusters": [{"name": "k", "cluster": {"server": server.url}}],
                "users": [{"name": "k", "user": {"token": "t"}}],
                "contexts": [{"name": "k", "context": {"cluster": "k", "user": "k", "namespace": rs.NS}}],
                "current-context": "k",
            }))
            mp.setenv("KUBECONFIG", str(kubeconfig))
            try:
                if scenario == "kubernetes":
                    rs.kubernetes_backend(server)
                elif scenario == "together":
                    rs.together_backend(server, tmp)
                else:
                    rs.adapterdeployment(server)
                out |= rs.operator_triples(server)
            finally:
                server.stop()
                kube.set_connection(None)
    finally:
        mp.undo()
    return out


def test_scenarios_exercise_the_handlers(recorded):
    must = {
        ("tuneop.dev", "finetunejobs", "watch"), ("tuneop.dev", "finetunejobs/status", "patch"),
        ("batch", "jobs", "create"), ("batch", "jobs", "delete"), ("batch", "jobs", "patch"),
        ("", "pods/log", "get"), ("", "secrets", "get"), ("", "events", "create"),
        ("", "services", "create"), ("", "secrets", "create"), ("", "events", "list"),
        ("apps", "replicasets", "list"),  # which vLLM pods are the Deployment's own
    }
    assert must <= recorded, "scenario did not get as far as expected:\n" + "\n".join(map(str, sorted(must - recorded)))


@pytest.mark.parametrize("values", [{}, NAMESPACED], ids=["cluster-wide", "namespaced"])
def test_rbac_covers_every_call_and_nothing_more(recorded, values):
    docs = render(values)
    kind = "Role" if values.get("watchNamespaces") else "ClusterRole"
    roles = operator_roles(docs, kind)
    assert roles
    for role in roles:
        granted = grants(role["rules"])
        cluster_scoped = {("", "namespaces"), ("apiextensions.k8s.io", "customresourcedefinitions")}
        needed = {t for t in recorded if kind == "ClusterRole" or (t[0], t[1]) not in cluster_scoped}
        missing = needed - granted
        assert not missing, "the chart's RBAC lacks verbs the operator uses:\n" + "\n".join(map(str, sorted(missing)))
        unused = granted - recorded - NOT_RECORDED
        assert not unused, "granted but never used (least privilege):\n" + "\n".join(map(str, sorted(unused)))
        secrets = {v for g, r, v in granted if g == "" and r == "secrets"}
        # get named Secrets, create the admin credential; never list, change or delete one
        assert secrets == {"get", "create"}, "Secrets: only get and create"


# ---------------------------------------------------------------------------------- Pod Security


def test_operator_pod_is_restricted():
    for values in ({}, NAMESPACED):
        pod = by_kind(render(values), "Deployment")[0]["spec"]["template"]["spec"]
        assert restricted_violations(pod) == []


# ---------------------------------------------------------------------------------- dashboard, alerts


def _promql_metrics(expr: str) -> set[str]:
    names = set(re.findall(r"\b((?:tuneop|vllm)[:_][a-zA-Z0-9_:]+)", expr))
    return names


def _exported_tuneop_metrics() -> set[str]:
    from prometheus_client import CollectorRegistry

    from tuneop.metrics import Metrics

    m = Metrics(CollectorRegistry())
    names = set()
    for family in m.registry.collect():
        names.add(family.name)
        for s in family.samples:
            names.add(s.name)
    from tuneop.serving import guard

    names.add(guard.METRIC)  # exported by tuneop's guard inside each vLLM pod
    for suffix in ("_bucket", "_sum", "_count", "_total"):
        names |= {n + suffix for n in list(names)}
    return names


# Metrics the dashboard/alerts use that the operator does not export yet (AdapterDeployment
# serving lands with adapterdeployment/handlers.py); the panels stay empty until then.
PENDING_METRICS: set[str] = set()


def _dashboard() -> dict[str, Any]:
    return json.loads((CHART / "files" / "dashboards" / "tuneop.json").read_text())


def test_dashboard_panels_use_known_metrics():
    dash = _dashboard()
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for want in ("phase", "loss", "progress", "cost", "reconcile", "adapters loaded", "throughput", "latency"):
        assert want in titles, want
    exported = _exported_tuneop_metrics()
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            for name in _promql_metrics(target["expr"]):
                if name.startswith("tuneop"):
                    assert name in exported or name in PENDING_METRICS, (panel["title"], name)
    cm = [d for d in render(ALL_ON) if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")][0]
    assert json.loads(cm["data"]["tuneop.json"]) == dash
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_alert_rules():
    rule = by_kind(render(ALL_ON), "PrometheusRule")[0]
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"TuneopFineTuneJobsFailed", "TuneopAdapterDeploymentNotReady"} <= set(alerts)
    exported = _exported_tuneop_metrics()
    for name, r in alerts.items():
        assert r["labels"]["severity"] in ("warning", "critical")
        assert "{{ $labels" in r["annotations"]["description"] or "$value" in r["annotations"]["description"] \
            or name in ("TuneopOperatorDown",)
        for m in _promql_metrics(r["expr"]):
            assert m in exported or m in PENDING_METRICS, (name, m)
    assert 'phase="Failed"' in alerts["TuneopFineTuneJobsFailed"]["expr"]
    assert 'job="tuneop-metrics"' in alerts["TuneopOperatorDown"]["expr"]
    assert "tuneop_vllm_admin_refused_total" in alerts["TuneopVllmAdminProbing"]["expr"]
    # The operator's series carry the namespace of each resource: the ServiceMonitor keeps it.
    sm = by_kind(render(ALL_ON), "ServiceMonitor")[0]
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True


def _ftj_example_docs():
    for path in sorted(ROOT.glob("examples/**/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "FineTuneJob":
                body = {**doc, "metadata": {"namespace": "ns", "uid": "u-1", "generation": 1, **doc["metadata"]}}
                yield pytest.param(body, id=f"{path.relative_to(ROOT)}:{doc['metadata']['name']}")


def _pods(objs):
    return [(f"{o['kind']} {o['metadata']['name']}", pod_spec_of(o))
            for o in objs if o["kind"] in ("Job", "Deployment", "StatefulSet", "Pod")]


@pytest.mark.parametrize("body", list(_ftj_example_docs()))
def test_pods_tuneop_creates_are_restricted(body):
    """Trainer / validate Jobs (backend kubernetes), upload / download Jobs (backend together)."""
    from tuneop.backends.together import builders as tb
    from tuneop.finetunejob import builders as fb

    image = "registry.example.com/tuneop/trainer:1"
    if body["spec"].get("backend") == "together":
        objs = [tb.build_upload_job(body, image=image, base_url="https://api.together.xyz"),
                tb.build_download_job(body, job_id="ft-1", image=image)]
    else:
        objs = fb.build_children(body, image=image)
    pods = _pods(objs)
    assert pods
    for what, pod in pods:
        assert restricted_violations(pod) == [], what


def test_vllm_pods_are_restricted():
    """The vLLM Deployment of every example AdapterDeployment: restricted, vLLM included (uid 10001,
    read-only root filesystem, caches and /tmp on emptyDirs), and so are the fetch init containers."""
    from tuneop.adapterdeployment import builders as ad

    docs = [d for p in sorted(ROOT.glob("examples/**/*.yaml")) for d in yaml.safe_load_all(p.read_text())
            if isinstance(d, dict) and d.get("kind") == "AdapterDeployment"]
    assert docs
    for doc in docs:
        body = {**doc, "metadata": {"namespace": "ns", "uid": "u-1", "generation": 1, **doc["metadata"]}}
        pods = _pods(ad.build_all(body))
        assert pods
        for what, pod in pods:
            assert restricted_violations(pod) == [], what
            vllm = pod["containers"][0]
            assert vllm["securityContext"]["readOnlyRootFilesystem"] is True
            env = {e["name"]: e.get("value") for e in vllm["env"]}
            writable = {m["mountPath"] for m in vllm["volumeMounts"]
                        if any(v["name"] == m["name"] and "emptyDir" in v for v in pod["volumes"])}
            for var in ("HOME", "HF_HOME", "XDG_CACHE_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR",
                        "TORCHINDUCTOR_CACHE_DIR"):
                assert any(env[var] == w or env[var].startswith(w + "/") for w in writable), (var, env[var])
            assert "/tmp" in writable


def test_the_checker_catches_each_rule():
    ok = by_kind(render(), "Deployment")[0]["spec"]["template"]["spec"]
    assert restricted_violations(ok) == []
    import copy

    def broken(f):
        pod = copy.deepcopy(ok)
        f(pod, pod["containers"][0]["securityContext"])
        return restricted_violations(pod)

    assert broken(lambda p, c: c.update(allowPrivilegeEscalation=True))
    assert broken(lambda p, c: c.update(privileged=True))
    assert broken(lambda p, c: c["capabilities"].update(add=["SYS_ADMIN"]))
    assert not broken(lambda p, c: c["capabilities"].update(add=["NET_BIND_SERVICE"]))
    assert broken(lambda p, c: c["capabilities"].update(drop=[]))
    assert broken(lambda p, c: (c.pop("runAsNonRoot"), p["securityContext"].pop("runAsNonRoot")))
    assert not broken(lambda p, c: c.pop("runAsNonRoot"))  # the pod's setting is enough
    assert broken(lambda p, c: c.update(runAsUser=0))
    assert broken(lambda p, c: (c.pop("seccompProfile"), p["securityContext"].pop("seccompProfile")))
    assert broken(lambda p, c: c.update(seccompProfile={"type": "Unconfined"}))
    assert broken(lambda p, c: p.update(hostNetwork=True))
    assert broken(lambda p, c: p.update(hostPID=True))
    assert broken(lambda p, c: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}))
    assert broken(lambda p, c: p["containers"][0]["ports"].append({"containerPort": 1, "hostPort": 1}))


def _static_calls() -> set[tuple[str, str, str]]:
    """(group, resource, verb) of the kube client calls in the handlers' source: catches a call
    the scenarios never reach. API_VERSION/KIND constants are tuneop's own kinds; other
    non-literal arguments are left to the recorded scenarios."""
    from tuneop import kube

    out: set[tuple[str, str, str]] = set()
    call = re.compile(
        r"\b(?:kc|kube\.client\(\))\.(get|list|patch|delete)\(\s*([^,()]+(?:\(\))?[^,()]*)\s*,\s*([^,()]+(?:\(\))?[^,()]*)\s*,"
    )
    for path in sorted((ROOT / "operator" / "tuneop").rglob("*.py")):
        if path.name == "kube.py" or "trainer" in path.parts:
            continue
        src = path.read_text()
        own_kind = "AdapterDeployment" if path.stem == "adapterdeployment" else "FineTuneJob"
        for m in call.finditer(src):
            verb, av, kind = m.group(1), m.group(2).strip(), m.group(3).strip()
            if av.startswith('"'):
                av = av.strip('"')
            elif av.endswith("API_VERSION"):
                av = "tuneop.dev/v1alpha1"
            else:
                continue  # e.g. ref["apiVersion"]: only the recorded scenarios can tell
            if kind.startswith('"'):
                kind = kind.strip('"')
            elif kind.endswith("KIND"):
                kind = "FineTuneJob" if "FTJ" in kind else own_kind
            else:
                continue  # e.g. the kinds of st.dependencies(): recorded in the scenarios
            plural, _ = kube.RESOURCES[(av, kind)]
            group = av.split("/")[0] if "/" in av else ""
            tail = src[m.end():m.end() + 200].split("await", 1)[0]
            sub = "/status" if 'subresource="status"' in tail else ""
            out.add((group, plural + sub, verb))
        if "pod_log(" in src:
            out.add(("", "pods/log", "get"))
        if "post_event(" in src or "kopf.event(" in src or "EVENTS.post(" in src:
            out.add(("", "events", "create"))
    return out


def test_rbac_covers_the_handlers_call_sites():
    calls = _static_calls()
    assert ("tuneop.dev", "finetunejobs/status", "patch") in calls and ("batch", "jobs", "get") in calls
    rules = operator_roles(render(), "ClusterRole")[0]["rules"]
    missing = calls - grants(rules)
    assert not missing, "handlers call the API without RBAC in the chart:\n" + "\n".join(map(str, sorted(missing)))


# ---------------------------------------------------------------------------------- examples


def _non_tuneop_example_docs():
    for path in sorted(ROOT.glob("examples/**/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and not doc.get("apiVersion", "").startswith("tuneop.dev/"):
                yield pytest.param(doc, id=f"{path.relative_to(ROOT)}:{doc['kind']}/{doc['metadata']['name']}")


@pytest.mark.parametrize("doc", list(_non_tuneop_example_docs()))
def test_non_tuneop_examples_validate_strictly(doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    if doc["kind"] == "Secret":
        values = list((doc.get("stringData") or {}).values()) + list((doc.get("data") or {}).values())
        assert values and all(v == "REPLACE_ME" for v in values), "example Secrets hold placeholders only"


def test_tenant_namespace_has_what_the_examples_need():
    docs = list(yaml.safe_load_all((ROOT / "examples" / "tenant-namespace.yaml").read_text()))
    have = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for path in sorted(ROOT.glob("examples/*.yaml")):
        text = path.read_text()
        for claim in re.findall(r"claimName: ([a-z0-9-]+)", text):
            assert ("PersistentVolumeClaim", claim) in have, (path.name, claim)
        for secret in re.findall(r"(?:hfTokenSecretRef|apiKeySecretRef|credentialsSecretRef): \{name: ([a-z0-9-]+)",
                                 text):
            assert ("Secret", secret) in have, (path.name, secret)
    quota = next(d for d in docs if d["kind"] == "ResourceQuota")
    assert "requests.nvidia.com/gpu" in quota["spec"]["hard"]


@pytest.mark.parametrize("values", [{}, NAMESPACED, {"operator": {"togetherBaseUrl": "http://t", "verbose": True}}],
                         ids=["defaults", "namespaced", "options"])
def test_operator_args_parse(values):
    """The image's ENTRYPOINT is `tuneop operator`: every argument the chart passes must parse."""
    from tuneop.cli import build_parser

    c = by_kind(render(values), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(["operator", *c["args"]])
    assert args.metrics_port == 8080 and args.liveness_port == 8081
    if values.get("watchNamespaces"):
        assert args.namespace == ["team-a", "team-b"] and not args.all_namespaces
    else:
        assert args.all_namespaces


def test_vllm_podmonitor_selects_the_vllm_pods():
    ad = pytest.importorskip("tuneop.adapterdeployment.builders")
    doc = next(d for p in sorted(ROOT.glob("examples/**/*.yaml")) for d in yaml.safe_load_all(p.read_text())
               if isinstance(d, dict) and d.get("kind") == "AdapterDeployment")
    body = {**doc, "metadata": {"namespace": "ns", "uid": "u-1", "generation": 1, **doc["metadata"]}}
    dep = next(o for o in ad.build_all(body) if o["kind"] == "Deployment")
    tmpl = dep["spec"]["template"]
    pm = by_kind(render(ALL_ON), "PodMonitor")[0]
    assert pm["spec"]["selector"]["matchLabels"].items() <= tmpl["metadata"]["labels"].items()
    port = pm["spec"]["podMetricsEndpoints"][0]["port"]
    assert port in {p.get("name") for c in tmpl["spec"]["containers"] for p in c.get("ports", [])}


def test_user_roles_aggregate_into_the_builtin_roles():
    roles = {r["metadata"]["name"]: r for r in by_kind(render(), "ClusterRole")}
    edit, view = roles["tuneop-edit"], roles["tuneop-view"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert ("tuneop.dev", "finetunejobs", "create") in grants(edit["rules"])
    assert not any(v in ("create", "patch", "update", "delete") for _, _, v in grants(view["rules"]))
    # People may not write the status: that is the operator's.
    assert not any(r.endswith("/status") and v not in ("get", "list", "watch") for _, r, v in grants(edit["rules"]))
    bound = {b["roleRef"]["name"] for b in by_kind(render(), "ClusterRoleBinding")}
    assert bound == {"tuneop"}


@pytest.mark.parametrize("bad", [{"watchNamespace": ["a"]}, {"watchNamespaces": ["Team_A"]},
                                 {"metrics": {"port": "8080x"}}, {"image": {"pullPolicy": "Sometimes"}}])
def test_values_schema_rejects_typos(bad):
    with pytest.raises(helm.HelmError):
        render(bad)


def test_workload_defaults_reach_the_operator_as_valid_json():
    from tuneop import workload_defaults as wd

    def env_of(values):
        c = by_kind(render(values), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value") for e in c["env"]}

    assert wd.parse(env_of({})[wd.ENV]) == {}
    gpu = {"nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
           "cpu": 8, "memory": "64Gi"}
    got = wd.parse(env_of({"workloads": {"trainer": gpu, "vllm": {"memory": "32Gi"}}})[wd.ENV])
    assert got == {"trainer": {**gpu, "cpu": "8"}, "vllm": {"memory": "32Gi"}}


def test_gpu_hourly_price_reaches_the_operator_as_it_parses_it():
    """operator.gpuHourlyPriceUSD -> $TUNEOP_GPU_HOURLY_PRICE_USD, read by `tuneop operator`; none by default."""
    from tuneop import cost

    def env(values):
        c = by_kind(render(values), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value") for e in c.get("env", [])}

    assert "TUNEOP_GPU_HOURLY_PRICE_USD" not in env({})
    priced = env({"operator": {"gpuHourlyPriceUSD": {"nvidia.com/gpu": 2.5, "amd.com/gpu": 1}}})
    assert cost.parse_prices(priced["TUNEOP_GPU_HOURLY_PRICE_USD"]) == {"nvidia.com/gpu": 2.5, "amd.com/gpu": 1.0}
