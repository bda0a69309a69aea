"""The deployment files under cluster/: every YAML parses, the keys KubeRay / the Ray cluster
launcher / Docker need are there and agree with each other, the entry points and configs they
name are the project's, and nothing in them looks like a credential."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
CACHE_DIR = "/mnt/local-nvme/step1x-cache"

EXPECTED_ENTRYPOINTS = {
    ("jobs/edit_dataset.py", "configs/step1x-edit-v1p1.yaml"),
    ("jobs/synthesize_pairs.py", "configs/synthesize-pairs.yaml"),
    ("jobs/rerender_catalog.py", "configs/rerender-catalog.yaml"),
}
# Written later (issue 4, items 1-2); delete an entry once its file lands so its absence fails.
_ENTRYPOINT = re.compile(r"^python (jobs/[\w]+\.py) --config (configs/[\w.\-]+\.ya?ml)(?:\s|$)")
_FROM = re.compile(r"^FROM\s+(\S+)", re.MULTILINE)
_RAY_IMAGE = re.compile(r"^rayproject/ray:(\d+\.\d+\.\d+)-py(3\d+)-cu(\d+)$")


def _yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kuberay_docs(kind: str) -> list[tuple[Path, dict]]:
    return [
        (p, d) for p in sorted((CLUSTER / "kuberay").glob("*.yaml")) for d in _docs(p)
        if d.get("kind") == kind
    ]


def _dockerfile_ray() -> tuple[str, str, str]:
    text = (CLUSTER / "docker" / "Dockerfile").read_text()
    image = _FROM.findall(text)[0]
    m = _RAY_IMAGE.match(image)
    assert m, f"Dockerfile FROM {image!r} is not rayproject/ray:<version>-py3XX-cuXXX"
    return m.group(1), m.group(2), m.group(3)


def _ray_cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


# --- the files are there and parse ----------------------------------------------------------------


def test_expected_files_exist_and_every_yaml_parses():
    for rel in (
        "README.md", "runtime_env.yaml", "docker/Dockerfile", "aws/cluster.yaml",
        "kuberay/raycluster.yaml", "kuberay/rayjob-edit-dataset.yaml",
        "kuberay/rayjob-synthesize-pairs.yaml", "kuberay/rayjob-rerender-catalog.yaml",
    ):
        assert (CLUSTER / rel).is_file(), rel
    files = _yaml_files()
    assert len(files) >= 7
    for path in files:
        docs = _docs(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), path


def test_kuberay_kinds():
    kinds = [(d.get("apiVersion"), d.get("kind")) for p in (CLUSTER / "kuberay").glob("*.yaml") for d in _docs(p)]
    for api, kind in kinds:
        assert kind in ("RayJob", "RayCluster", "ServiceAccount"), kind
        if kind in ("RayJob", "RayCluster"):
            assert api == "ray.io/v1", (kind, api)
    assert sum(k == "RayJob" for _, k in kinds) == 3
    assert sum(k == "RayCluster" for _, k in kinds) == 1


# --- RayJobs ----------------------------------------------------------------------------------------


RAYJOBS = _kuberay_docs("RayJob")


@pytest.mark.parametrize("path,doc", RAYJOBS, ids=[p.name for p, _ in RAYJOBS])
def test_rayjob_lifecycle_keys(path, doc):
    spec = doc["spec"]
    assert doc["metadata"].get("name") or doc["metadata"].get("generateName")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec["submissionMode"] == "K8sJobMode"
    assert _ENTRYPOINT.match(spec["entrypoint"]), spec["entrypoint"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["STEP1X_WEIGHTS_CACHE"] == CACHE_DIR
    assert "pip" not in runtime_env  # the image has the dependencies


def test_rayjobs_name_the_three_jobs_and_their_files_exist():
    named = {_ENTRYPOINT.match(d["spec"]["entrypoint"]).groups() for _, d in RAYJOBS}
    assert named == EXPECTED_ENTRYPOINTS
    for job, config in sorted(named):
        for rel in (job, config):
            assert (ROOT / rel).is_file(), f"{rel} is named by a RayJob but is not in the repository"
    # The configs that exist are real job configs (parse as YAML mappings with a model section).
    for _, config in named:
        if (ROOT / config).exists():
            raw = yaml.safe_load((ROOT / config).read_text())
            assert isinstance(raw, dict) and "model" in raw, config


def test_edit_dataset_config_is_a_valid_job_config():
    from step1x_batch.job.config import load_config

    cfg = load_config(str(ROOT / "configs" / "step1x-edit-v1p1.yaml"))
    assert cfg.resources.num_gpus_per_actor >= 1  # the GPU RayJob runs the GPU config


# --- the Ray clusters (RayJob's and the long-lived one) ---------------------------------------------


RAY_CLUSTERS = RAYJOBS + _kuberay_docs("RayCluster")


def _gpu_group(spec: dict) -> dict:
    groups = [
        g for g in spec["workerGroupSpecs"]
        if any("nvidia.com/gpu" in (c.get("resources", {}).get("limits") or {})
               for c in g["template"]["spec"]["containers"])
    ]
    assert len(groups) == 1, "expected exactly one GPU worker group"
    return groups[0]


@pytest.mark.parametrize("path,doc", RAY_CLUSTERS, ids=[p.name for p, _ in RAY_CLUSTERS])
def test_cluster_spec_gpu_workers_and_weights_cache(path, doc):
    spec = _ray_cluster_spec(doc)
    assert spec["rayVersion"] == _dockerfile_ray()[0], "rayVersion must match the image's Ray"
    head = spec["headGroupSpec"]["template"]["spec"]
    assert not any("nvidia.com/gpu" in (c.get("resources", {}).get("limits") or {}) for c in head["containers"])

    group = _gpu_group(spec)
    pod = group["template"]["spec"]
    (container,) = [c for c in pod["containers"] if "nvidia.com/gpu" in c["resources"]["limits"]]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    requests = container["resources"].get("requests") or {}
    if "nvidia.com/gpu" in requests:
        assert requests["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["nodeSelector"], "a nodeSelector example for the GPU pool"

    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env["STEP1X_WEIGHTS_CACHE"] == CACHE_DIR
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert CACHE_DIR in mounts, "the weights cache must be a mounted volume"
    volumes = {v["name"]: v for v in pod["volumes"]}
    cache_volume = volumes[mounts[CACHE_DIR]]
    assert "hostPath" in cache_volume or "emptyDir" in cache_volume
    if "hostPath" in cache_volume:
        assert cache_volume["hostPath"]["path"].startswith("/mnt/local-nvme")
    for name in mounts.values():
        assert name in volumes, f"volumeMount {name} has no volume"

    for c in head["containers"] + pod["containers"]:
        image = c["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
        for source in c.get("envFrom", []):
            assert set(source) <= {"secretRef", "configMapRef", "prefix"}
            if "secretRef" in source:
                assert set(source["secretRef"]) <= {"name", "optional"}


def test_long_lived_cluster_autoscales_gpu_workers_from_zero():
    ((_, doc),) = _kuberay_docs("RayCluster")
    assert doc["spec"]["enableInTreeAutoscaling"] is True
    group = _gpu_group(doc["spec"])
    assert group["minReplicas"] == 0 and group["maxReplicas"] > 0


# --- AWS cluster launcher -----------------------------------------------------------------------------


def test_aws_cluster_launcher():
    (cfg,) = _docs(CLUSTER / "aws" / "cluster.yaml")
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    assert isinstance(cfg["max_workers"], int) and cfg["max_workers"] > 0
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not head.get("resources", {}).get("GPU")
    gpu_types = {n: t for n, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0}
    assert gpu_types, "at least one GPU worker type"
    for name, t in gpu_types.items():
        node = t["node_config"]
        assert node["InstanceType"].split(".")[0] in ("g6e", "g5", "g6", "p4d", "p4de", "p5", "p5e", "p5en"), name
        assert node["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert t["max_workers"] <= cfg["max_workers"]
        assert t.get("min_workers", 0) == 0
    for name, t in types.items():
        sizes = [m["Ebs"]["VolumeSize"] for m in t["node_config"]["BlockDeviceMappings"]]
        assert sizes and all(s >= 100 for s in sizes), name
    assert cfg["docker"]["image"] and cfg["docker"]["container_name"]
    assert any(f"STEP1X_WEIGHTS_CACHE={CACHE_DIR}" in o for o in cfg["docker"]["run_options"])
    assert any("pip install" in c and "step1x-batch" in c for c in cfg["setup_commands"])


# --- image and runtime env ----------------------------------------------------------------------------


def test_dockerfile_base_and_install():
    text = (CLUSTER / "docker" / "Dockerfile").read_text()
    froms = _FROM.findall(text)
    assert froms and all(f.startswith("rayproject/ray:") for f in froms)
    assert "ray-ml" not in "".join(froms)
    version, py, cuda = _dockerfile_ray()
    assert py == "311" and cuda.startswith("12")
    assert re.search(r"torch==\$\{TORCH_VERSION\}|torch==\d", text), "rayproject/ray has no torch"
    assert re.search(rf"whl/cu{cuda}\b", text), "torch's CUDA build must match the base image"
    assert re.search(r"pip install[^\n]*\s\.\s", text), "the package itself is installed"
    assert f'"ray=={version}"' in text, "pin Ray to the base's version"
    for source in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text, re.MULTILINE):
        for item in source.split():
            assert (ROOT / item).exists(), f"COPY source {item} is not in the repository"
    assert f"STEP1X_WEIGHTS_CACHE={CACHE_DIR}" in text


def test_image_ray_version_satisfies_the_package():
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ImportError:  # pragma: no cover
        pytest.skip("tomllib needs Python 3.11")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [Requirement(d) for d in deps if Requirement(d).name == "ray"]
    assert ray.specifier.contains(_dockerfile_ray()[0])


def test_runtime_env_example():
    (env,) = _docs(CLUSTER / "runtime_env.yaml")
    assert env["working_dir"]
    assert "pip" in env or "image_uri" in env
    if "pip" in env:
        packages = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
        assert any(p.startswith("torch") for p in packages)
    assert env["env_vars"]["STEP1X_WEIGHTS_CACHE"] == CACHE_DIR
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert not any(_looks_secret_key(k) for k in env["env_vars"])


# --- no credentials -------------------------------------------------------------------------------------


_CREDENTIAL_PATTERNS = [
    re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
    re.compile(r"aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{8,}", re.I),
    re.compile(r"aws_session_token\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{8,}", re.I),
    re.compile(r"\bpassword\s*[:=]\s*['\"]?\S+", re.I),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b(?:ghp|gho|github_pat|hf|xox[bp])_[A-Za-z0-9_]{16,}"),
]


def _looks_secret_key(name: str) -> bool:
    return bool(
        re.search(r"secret|password|passwd|(?:^|_)token(?:$|_)|access_key|private_key|api_key", name, re.I)
    )


def _credential_hits(text: str) -> list[str]:
    hits = [m.group(0) for p in _CREDENTIAL_PATTERNS for m in p.finditer(text)]
    # env entries that give a secret-named variable a literal value
    for m in re.finditer(r"name:\s*(\w+)\s*,?\s*\n?\s*value:\s*(\S+)", text):
        if _looks_secret_key(m.group(1)):
            hits.append(m.group(0))
    return hits


def test_credential_detector_catches_planted_secrets():
    planted = [
        "key: AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMI/K7MDENG",
        "password: hunter2",
        "- {name: AWS_SECRET_ACCESS_KEY, value: abc123}",
        "- name: HF_TOKEN\n  value: abcdef",
        "-----BEGIN RSA PRIVATE KEY-----",
    ]
    for text in planted:
        assert _credential_hits(text), text
    assert not _credential_hits("a Secret holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")


@pytest.mark.parametrize("path", sorted(p for p in CLUSTER.rglob("*") if p.is_file()),
                         ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_credentials_in_cluster_files(path):
    assert not _credential_hits(path.read_text()), path
