"""The deployment files under cluster/: every YAML parses, the keys KubeRay / the Ray cluster
launcher / Docker need are there and agree with each other, the entry points and configs they
name are the project's, and nothing in them looks like a credential."""

from __future__ import annotations

import json
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
_ENTRYPOINT = re.compile(r"^python (jobs/[\w]+\.py) --config (configs/[\w.\-]+\.ya?ml)(?:\s|$)")
_SCORE_ENTRYPOINT = re.compile(r"^step1x-batch score (s3://\S+) --config (configs/[\w.\-]+\.ya?ml)$")
JUDGE_RESOURCE = "judge_gpu"  # the Ray resource only the judge's worker group advertises
JUDGE_KEY_ENV = "JUDGE_API_KEY"  # configs/judge-http.yaml's api_key_env
JUDGE_KEY_SECRET = "step1x-judge-api-key"
MODELS_DIR = "/models"
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
        "kuberay/rayjob-score.yaml", "kuberay/judge-models.yaml",
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
        assert kind in ("RayJob", "RayCluster", "ServiceAccount", "PersistentVolumeClaim"), kind
        if kind in ("RayJob", "RayCluster"):
            assert api == "ray.io/v1", (kind, api)
    assert sum(k == "RayJob" for _, k in kinds) == 4
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
    assert _ENTRYPOINT.match(spec["entrypoint"]) or _SCORE_ENTRYPOINT.match(spec["entrypoint"]), spec["entrypoint"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["STEP1X_WEIGHTS_CACHE"] == CACHE_DIR
    assert "pip" not in runtime_env  # the image has the dependencies


def test_rayjobs_name_the_three_jobs_and_their_files_exist():
    named = {_ENTRYPOINT.match(d["spec"]["entrypoint"]).groups() for _, d in RAYJOBS
             if _ENTRYPOINT.match(d["spec"]["entrypoint"])}
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


def _ray_resources(group: dict) -> dict:
    """The custom Ray resources a group advertises (``rayStartParams.resources``: a JSON object
    written as a quoted, escaped string, as KubeRay passes it to ``ray start --resources``)."""
    raw = group.get("rayStartParams", {}).get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def _gpu_groups(spec: dict) -> list[dict]:
    return [
        g for g in spec["workerGroupSpecs"]
        if any("nvidia.com/gpu" in (c.get("resources", {}).get("limits") or {})
               for c in g["template"]["spec"]["containers"])
    ]


def _judge_groups(spec: dict) -> list[dict]:
    return [g for g in _gpu_groups(spec) if JUDGE_RESOURCE in _ray_resources(g)]


def _edit_groups(spec: dict) -> list[dict]:
    return [g for g in _gpu_groups(spec) if JUDGE_RESOURCE not in _ray_resources(g)]


def _gpu_group(spec: dict) -> dict:
    groups = _edit_groups(spec)
    assert len(groups) == 1, "expected exactly one edit GPU worker group"
    return groups[0]


def _gpu_container(group: dict) -> dict:
    (container,) = [c for c in group["template"]["spec"]["containers"]
                    if "nvidia.com/gpu" in c["resources"]["limits"]]
    return container


def _containers(spec: dict) -> list[dict]:
    """Every container of the head and of every worker group (init containers aside)."""
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["containers"]]


def _check_gpu_pod(pod: dict, container: dict) -> None:
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    requests = container["resources"].get("requests") or {}
    if "nvidia.com/gpu" in requests:
        assert requests["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["nodeSelector"], "a nodeSelector example for the GPU pool"


@pytest.mark.parametrize("path,doc", RAY_CLUSTERS, ids=[p.name for p, _ in RAY_CLUSTERS])
def test_cluster_spec_gpu_workers_and_weights_cache(path, doc):
    spec = _ray_cluster_spec(doc)
    assert spec["rayVersion"] == _dockerfile_ray()[0], "rayVersion must match the image's Ray"
    head = spec["headGroupSpec"]["template"]["spec"]
    assert not any("nvidia.com/gpu" in (c.get("resources", {}).get("limits") or {}) for c in head["containers"])
    assert _gpu_groups(spec), "at least one GPU worker group"
    if not _edit_groups(spec):  # a cluster that only judges (the score RayJob)
        assert doc["kind"] == "RayJob" and _SCORE_ENTRYPOINT.match(doc["spec"]["entrypoint"]), path
    else:
        group = _gpu_group(spec)
        pod = group["template"]["spec"]
        container = _gpu_container(group)
        _check_gpu_pod(pod, container)

        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env["STEP1X_WEIGHTS_CACHE"] == CACHE_DIR
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert CACHE_DIR in mounts, "the weights cache must be a mounted volume"
        volumes = {v["name"]: v for v in pod["volumes"]}
        cache_volume = volumes[mounts[CACHE_DIR]]
        assert "hostPath" in cache_volume or "emptyDir" in cache_volume
        if "hostPath" in cache_volume:
            assert cache_volume["hostPath"]["path"].startswith("/mnt/local-nvme")

    pods = [head] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in pod["containers"] + pod.get("initContainers", []):
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"volumeMount {m['name']} has no volume"
    for c in _containers(spec):
        image = c["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
        for source in c.get("envFrom", []):
            assert set(source) <= {"secretRef", "configMapRef", "prefix"}
            if "secretRef" in source:
                assert set(source["secretRef"]) <= {"name", "optional"}


def test_long_lived_cluster_autoscales_gpu_workers_from_zero():
    ((_, doc),) = _kuberay_docs("RayCluster")
    assert doc["spec"]["enableInTreeAutoscaling"] is True
    for group in (_gpu_group(doc["spec"]), *_judge_groups(doc["spec"])):
        assert group["minReplicas"] == 0 and group["maxReplicas"] > 0, group["groupName"]
    assert len(_judge_groups(doc["spec"])) == 1, "the long-lived cluster has the judge's own group"


# --- the judge's workers ---------------------------------------------------------------------------


JUDGE_CLUSTERS = [(p, d) for p, d in RAY_CLUSTERS if _judge_groups(_ray_cluster_spec(d))]


def _judge_models_claim() -> str:
    (claim,) = _docs(CLUSTER / "kuberay" / "judge-models.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["apiVersion"] == "v1"
    assert "ReadWriteMany" in claim["spec"]["accessModes"] or "ReadOnlyMany" in claim["spec"]["accessModes"]
    return claim["metadata"]["name"]


def test_the_judge_has_a_group_in_the_long_lived_cluster_and_the_score_job():
    assert {p.name for p, _ in JUDGE_CLUSTERS} == {"raycluster.yaml", "rayjob-score.yaml"}


@pytest.mark.parametrize("path,doc", JUDGE_CLUSTERS, ids=[p.name for p, _ in JUDGE_CLUSTERS])
def test_judge_group_advertises_one_judge_gpu_per_gpu(path, doc):
    """Only the judge's group advertises ``judge_gpu``, one per GPU of its pods: a judge replica asks
    for one per GPU it uses, so it lands there and never on an edit GPU."""
    spec = _ray_cluster_spec(doc)
    assert JUDGE_RESOURCE not in json.dumps(spec["headGroupSpec"].get("rayStartParams", {}))
    for group in _judge_groups(spec):
        container = _gpu_container(group)
        _check_gpu_pod(group["template"]["spec"], container)
        assert _ray_resources(group)[JUDGE_RESOURCE] == int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert "STEP1X_WEIGHTS_CACHE" not in {e["name"] for e in container.get("env", [])}  # no edit weights
    for group in spec["workerGroupSpecs"]:
        if group not in _judge_groups(spec):
            assert JUDGE_RESOURCE not in _ray_resources(group), group["groupName"]


def test_the_edit_gpu_group_advertises_edit_gpu_for_custom_per_actor():
    """``resources.custom_per_actor: {edit_gpu: 1}`` keeps edit actors off the judge's GPUs: the
    long-lived cluster's edit GPU group (and the AWS GPU node types) advertise one per GPU."""
    (doc,) = [d for p, d in JUDGE_CLUSTERS if p.name == "raycluster.yaml"]
    spec = _ray_cluster_spec(doc)
    edit = [g for g in spec["workerGroupSpecs"] if g not in _judge_groups(spec)
            and "nvidia.com/gpu" in json.dumps(g["template"])]
    assert edit
    for group in edit:
        gpus = int(_gpu_container(group)["resources"]["limits"]["nvidia.com/gpu"])
        assert _ray_resources(group).get("edit_gpu") == gpus and JUDGE_RESOURCE not in _ray_resources(group)
    aws = yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())
    for name, node in aws["available_node_types"].items():
        res = node["resources"]
        if res.get("GPU") and JUDGE_RESOURCE not in res:
            assert res.get("edit_gpu") == res["GPU"], name


@pytest.mark.parametrize("path,doc", JUDGE_CLUSTERS, ids=[p.name for p, _ in JUDGE_CLUSTERS])
def test_every_pod_of_a_judging_cluster_mounts_the_models_and_reads_the_key_from_a_secret(path, doc):
    """The driver, ray.data.llm's CPU stages and the engines all read judge.model, and HTTP
    requests go out from any worker: every pod has the model volume and the key's variable, the
    key from a Kubernetes Secret, never a literal."""
    spec = _ray_cluster_spec(doc)
    claim = _judge_models_claim()
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == MODELS_DIR]
            assert mount.get("readOnly") is True
            assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim
            (key,) = [e for e in c["env"] if e["name"] == JUDGE_KEY_ENV]
            assert "value" not in key
            ref = key["valueFrom"]["secretKeyRef"]
            assert ref["name"] == JUDGE_KEY_SECRET and ref["key"] and ref.get("optional") is True


def test_the_key_variable_is_the_one_the_http_judge_config_names():
    from step1x_batch.judge.config import JudgeConfig

    raw = yaml.safe_load((ROOT / "configs" / "judge-http.yaml").read_text())
    assert JudgeConfig.model_validate(raw["judge"]).api_key_env == JUDGE_KEY_ENV


def test_no_secret_named_variable_has_a_literal_value_in_any_pod():
    for _, doc in RAY_CLUSTERS:
        for c in _containers(_ray_cluster_spec(doc)):
            for e in c.get("env", []):
                if _looks_secret_key(e["name"]):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], (c["name"], e)


def test_the_score_job_fits_its_judge_config():
    """rayjob-score.yaml against the config it names: the model under the mounted folder, enough
    judge GPUs for every tensor-parallel replica (each inside one pod), the accelerator it asks
    for, the custom resources it asks for advertised, and vLLM in every pod's image."""
    from step1x_batch.judge.config import JudgeConfig

    (doc,) = [d for _, d in RAYJOBS if _SCORE_ENTRYPOINT.match(d["spec"]["entrypoint"])]
    _, config = _SCORE_ENTRYPOINT.match(doc["spec"]["entrypoint"]).groups()
    assert (ROOT / config).is_file(), config
    judge = JudgeConfig.model_validate(yaml.safe_load((ROOT / config).read_text())["judge"])
    assert judge.engine == "vllm" and judge.model.startswith(MODELS_DIR + "/")
    spec = _ray_cluster_spec(doc)
    groups = _judge_groups(spec)
    per_pod = [int(_gpu_container(g)["resources"]["limits"]["nvidia.com/gpu"]) for g in groups]
    tp = judge.engine_kwargs.get("tensor_parallel_size", 1) * judge.engine_kwargs.get("pipeline_parallel_size", 1)
    assert all(n % tp == 0 for n in per_pod), "a tensor-parallel replica stays inside one pod"
    total = sum(g["replicas"] * n for g, n in zip(groups, per_pod))
    assert total >= judge.resources.concurrency * tp, "every replica gets its GPUs"
    if judge.resources.accelerator_type:
        for g in groups:
            assert judge.resources.accelerator_type in g["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
    for name in judge.resources.custom:
        assert all(name in _ray_resources(g) for g in groups), name
    assert all(c["image"].endswith("-vllm") for c in _containers(spec)), "ray.data.llm's stages import vLLM"


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


def test_aws_judge_node_type_has_its_own_gpus():
    (cfg,) = _docs(CLUSTER / "aws" / "cluster.yaml")
    types = cfg["available_node_types"]
    judges = {n: t for n, t in types.items() if JUDGE_RESOURCE in t.get("resources", {})}
    assert len(judges) == 1, "one node type for the judge"
    ((name, judge),) = judges.items()
    assert judge["resources"][JUDGE_RESOURCE] == judge["resources"]["GPU"] > 0, name  # one per GPU
    assert judge.get("min_workers", 0) == 0 and judge["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert not any(JUDGE_RESOURCE in t.get("resources", {}) for n, t in types.items() if n != name)


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


def test_dockerfile_adds_vllm_at_the_base_rays_version_on_request():
    text = (CLUSTER / "docker" / "Dockerfile").read_text()
    version = _dockerfile_ray()[0]
    assert re.search(r"^ARG WITH_VLLM=0$", text, re.MULTILINE), "vLLM only when asked: the edit image stays lean"
    assert f'"ray[llm]=={version}"' in text, "Ray's LLM extra pins the vLLM tested with this Ray"
    assert "import vllm, ray.data.llm, step1x_batch.judge.stage" in text, "the build checks the judge imports"


def test_readme_judge_example_is_a_valid_judge_config_targeting_the_judge_group():
    from step1x_batch.judge.config import JudgeConfig

    text = (CLUSTER / "README.md").read_text()
    section = text.split("## Judging edits", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)
    judge = JudgeConfig.model_validate(yaml.safe_load(block)["judge"])
    assert judge.resources.custom == {JUDGE_RESOURCE: 1} and judge.model.startswith(MODELS_DIR + "/")
    for rel in re.findall(r"cluster/(kuberay/[\w.\-]+\.yaml)", section):
        assert (CLUSTER / rel).is_file(), rel


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
