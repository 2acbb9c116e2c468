"""cluster.yaml passes Ray's own autoscaler validation and opens nothing but SSH."""
import copy
from pathlib import Path

import pytest
import yaml
from jsonschema import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_ray_validation(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_ray_validation_rejects_a_broken_copy(cluster):
    # The check above is only worth something if the validator can say no.
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "many"
    with pytest.raises(ValidationError):
        validate_config(prepare_config(broken))


def test_gpu_worker_group_scales_between_min_and_max(cluster):
    workers = cluster["available_node_types"]["gpu_worker"]
    assert 0 <= workers["min_workers"] <= workers["max_workers"] <= cluster["max_workers"]
    assert cluster["head_node_type"] == "head"


def test_security_group_opens_ssh_only(cluster):
    rules = cluster["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"], r["IpProtocol"]) for r in rules] == [(22, 22, "tcp")]


def test_every_node_starts_ray_with_token_auth_and_a_local_dashboard(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    worker = " ".join(cluster["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head
    assert "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token ray start --address" in worker
    assert "~/.ray/auth_token" in cluster["file_mounts"]


def test_setup_installs_reelray_with_the_pinned_versions(cluster):
    setup = " ".join(cluster["setup_commands"])
    assert "-c ~/reelray/constraints.txt" in setup and "-e ~/reelray" in setup
