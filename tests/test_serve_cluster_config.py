"""serve/config.cluster.yaml: valid for `serve deploy`, the same app as serve/config.yaml apart from
what a cluster needs (all interfaces, code by runtime_env, more replicas, GPUs by setting). No Ray started."""
from __future__ import annotations

import pytest
import yaml

from flowers.config import ConfigError


def test_cluster_config_is_a_valid_serve_deploy_file():
    from ray.serve.schema import ServeDeploySchema

    from serve.config import CLUSTER_CONFIG, DEFAULT_CONFIG

    raw = yaml.safe_load(CLUSTER_CONFIG.read_text())
    ServeDeploySchema.model_validate(raw)
    assert raw["http_options"]["host"] == "0.0.0.0" and raw["proxy_location"] == "EveryNode"
    app = raw["applications"][0]
    local = yaml.safe_load(DEFAULT_CONFIG.read_text())["applications"][0]
    assert app["import_path"] == local["import_path"] and app["args"] == local["args"] | {
        "tracking_uri": None}  # same models, limits and threshold
    renv = app["runtime_env"]
    assert renv["working_dir"].endswith(".zip") and "://" in renv["working_dir"]  # a URI every node fetches
    assert renv["env_vars"] == local["runtime_env"]["env_vars"]
    for d in app["deployments"]:
        auto = d["autoscaling_config"]
        assert 1 <= auto["min_replicas"] < auto["max_replicas"], d["name"]
        assert "num_gpus" in d["ray_actor_options"], d["name"]


def test_cluster_config_builds_the_app_with_gpus_from_a_setting():
    from serve import config as C
    from serve.app import app_from_config
    from serve.run import gpu_overrides

    f = C.read(C.CLUSTER_CONFIG)
    assert f.proxy_location == "EveryNode" and f.http_options["host"] == "0.0.0.0"
    uris = {"ensemble_uri": "/tmp/e", "student_uri": "/tmp/s"}
    spec = app_from_config(C.CLUSTER_CONFIG, uris)
    assert spec.required_gpus() == 0
    spec = app_from_config(C.CLUSTER_CONFIG, uris, gpu_overrides(f, 0.5))
    ens = spec.deployment_options["Ensemble"]
    # the YAML's other actor options stay; min replicas x share
    assert ens["ray_actor_options"]["num_gpus"] == 0.5 and ens["ray_actor_options"]["num_cpus"] == \
        f.deployments["Ensemble"]["ray_actor_options"]["num_cpus"]
    mins = sum(o["autoscaling_config"]["min_replicas"] for o in f.deployments.values())
    assert spec.required_gpus() == 0.5 * mins
    assert gpu_overrides(f, None) == {}
    with pytest.raises(ConfigError, match="--gpus must be >= 0"):
        gpu_overrides(f, -1)


def test_deploy_parses_gpus():
    import argparse

    from serve.options import add_arguments, settings

    p = argparse.ArgumentParser()
    add_arguments(p, pin=True)
    assert settings(p.parse_args(["--gpus", "1"])).gpus == 1.0
    assert settings(p.parse_args([])).gpus is None


def test_build_app_is_a_builder_serve_deploy_accepts():
    """`serve deploy` calls the import path with the `args:` dict and refuses a builder of more than
    one parameter (a config deploy failed that way); Python callers pass options to make_app."""
    import inspect

    from serve.app import build_app, make_app

    assert len(inspect.signature(build_app).parameters) == 1
    assert list(inspect.signature(make_app).parameters) == ["args", "deployment_options"]
