"""workload_defaults.py: the platform's defaults for the pods tuneop creates."""
from __future__ import annotations

import json

import pytest

from tuneop import workload_defaults as wd

GPU_NODES = {"nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                               "effect": "NoSchedule"}],
             "cpu": 8, "memory": "64Gi"}


def test_parse_accepts_json_and_mappings_and_drops_empty_fields():
    assert wd.parse(None) == {} and wd.parse("") == {} and wd.parse("{}") == {}
    got = wd.parse({"trainer": GPU_NODES, "vllm": {"nodeSelector": {}, "cpu": ""}})
    assert got == {"trainer": {**GPU_NODES, "cpu": "8"}}
    assert wd.parse('{"vllm": {"memory": "32Gi"}}') == {"vllm": {"memory": "32Gi"}}


@pytest.mark.parametrize("raw,where", [
    ("{nope", "not JSON"),
    ('["trainer"]', "must be an object"),
    ({"trainer": {"nodeselector": {"a": "b"}}}, "trainer.nodeselector: unknown field"),
    ({"jobs": {}}, "unknown kind 'jobs'"),
    ({"vllm": {"nodeSelector": {"a": 1}}}, "vllm.nodeSelector"),
    ({"vllm": {"tolerations": [{"operator": "Maybe"}]}}, "vllm.tolerations[0].operator"),
    ({"vllm": {"tolerations": [{"tolerationSeconds": "soon"}]}}, "vllm.tolerations[0].tolerationSeconds"),
    ({"trainer": {"cpu": True}}, "trainer.cpu"),
    ({"trainer": "gpu"}, "trainer must be an object"),
])
def test_parse_names_the_bad_field(raw, where):
    with pytest.raises(wd.DefaultsError, match=None) as e:
        wd.parse(raw)
    assert where in str(e.value)


def test_apply_fills_only_what_the_spec_leaves_empty():
    defaults = wd.parse({"trainer": GPU_NODES})
    spec = {"baseModel": "m", "resources": {"gpus": 2, "memory": "128Gi", "nodeSelector": {}}}
    got = wd.apply(spec, defaults, "trainer")
    assert got["resources"] == {"gpus": 2, "memory": "128Gi", "nodeSelector": {"pool": "gpu"},
                                "tolerations": GPU_NODES["tolerations"], "cpu": "8"}
    assert spec["resources"] == {"gpus": 2, "memory": "128Gi", "nodeSelector": {}}  # input untouched
    # no resources block at all, another kind's defaults, no defaults
    assert wd.apply({"baseModel": "m"}, defaults, "trainer")["resources"]["nodeSelector"] == {"pool": "gpu"}
    assert wd.apply({"baseModel": "m"}, defaults, "vllm") == {"baseModel": "m"}
    assert wd.apply(spec, {}, "trainer") == spec


def test_user_values_win_field_by_field():
    defaults = wd.parse({"vllm": GPU_NODES})
    mine = [{"key": "team", "operator": "Equal", "value": "a", "effect": "NoSchedule"}]
    got = wd.apply({"resources": {"nodeSelector": {"pool": "mine"}, "tolerations": mine}}, defaults, "vllm")
    assert got["resources"]["nodeSelector"] == {"pool": "mine"} and got["resources"]["tolerations"] == mine
    assert got["resources"]["cpu"] == "8"


def test_defaults_reach_the_built_pods():
    from tuneop.adapterdeployment import builders as b

    ad = {"metadata": {"name": "q", "namespace": "n", "uid": "u"},
          "spec": wd.apply({"baseModel": "m"}, wd.parse({"vllm": GPU_NODES}), "vllm")}
    pod = b.build_pod_template(ad)["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["containers"][0]["resources"]["requests"] == {"cpu": "8", "memory": "64Gi"}


def test_apply_to_a_built_training_pod_keeps_the_spec_hash():
    from tuneop.finetunejob import builders as fb

    ftj = {"apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "j", "namespace": "n", "uid": "u", "generation": 1},
           "spec": {"baseModel": "m", "dataset": {"train": {"pvc": {"claimName": "d", "path": "t.jsonl"}}},
                    "output": {"pvc": {"claimName": "o"}}, "resources": {"gpus": 1, "memory": "32Gi"}}}
    job = fb.build_training_job(ftj)
    before = json.loads(json.dumps(job["metadata"]))
    pod = job["spec"]["template"]["spec"]
    wd.apply_to_pod(pod, wd.parse({"trainer": GPU_NODES})["trainer"])
    assert pod["nodeSelector"] == {"pool": "gpu"} and pod["tolerations"] == GPU_NODES["tolerations"]
    res = pod["containers"][0]["resources"]
    assert res["requests"] == {"memory": "32Gi", "cpu": "8"}  # the spec's memory wins
    assert res["limits"]["cpu"] == "8" and res["limits"]["memory"] == "32Gi" and res["limits"]["nvidia.com/gpu"] == 1
    assert job["metadata"] == before  # spec hash and names untouched
    assert wd.apply_to_pod({"containers": [{"name": "c"}]}, None) == {"containers": [{"name": "c"}]}
    assert wd.apply_to_pod({"containers": [{"name": "c"}]}, {"nodeSelector": {"a": "b"}}) == {
        "containers": [{"name": "c"}], "nodeSelector": {"a": "b"}}
