"""deploy/ matches the project: the image, the KubeRay manifests, the `ray up` config and the
commands in docs/cluster.md ("On a real cluster").

Parsed, never applied: no cluster, registry or network. Each check is a small function that
raises AssertionError naming the file and what to change; the tests at the end feed it altered
copies to show it does turn red (a renamed entry point, a flag the parser refuses, a config key
that does not exist, another allocator value, a head with CPUs).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import importlib.metadata
import io
import json
import re
import shlex
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from flowers.config import ConfigError
from flowers.runtime import GLIBC_TUNING
from flowers.storage import ENDPOINT_VARS, is_remote
from flowers.study.plan import build_trials, load_study
from jobs.options import ENTRYPOINTS, add_score_arguments, add_study_arguments, add_tune_arguments
from serve import options as serve_options
from serve.ingress_env import ingress_env

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
RAYJOB = DEPLOY / "kuberay" / "rayjob-study.yaml"
RAYSERVICE = DEPLOY / "kuberay" / "rayservice.yaml"
RAY_CLUSTER = DEPLOY / "ray-cluster.yaml"
CLUSTER_DOC = ROOT / "docs" / "cluster.md"
DOC_SECTION = "## On a real cluster"

# the argparse builder of each `python -m jobs.<name>` (test_parser_builders_are_the_jobs_own
# checks that each jobs/<name>.py really uses it)
PARSERS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "study": add_study_arguments,
    "tune": add_tune_arguments,
    "score": add_score_arguments,
    "deploy": lambda p: serve_options.add_arguments(p, pin=True),
}
BUILDER_NAMES = {"study": "add_study_arguments", "tune": "add_tune_arguments",
                 "score": "add_score_arguments", "deploy": "add_arguments"}
SERVE_FRONT = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH")


# ----------------------------------------------------------------------------- reading the files


def project_version() -> str:
    m = re.search(r'^\[project\].*?^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.S | re.M)
    assert m, "pyproject.toml: no [project] version"
    return m.group(1)


def package_dirs() -> list[str]:
    """Top-level packages `pip install .` ships (pyproject's packages.find include patterns)."""
    m = re.search(r"^include\s*=\s*\[([^\]]*)\]", (ROOT / "pyproject.toml").read_text(), re.M)
    assert m, "pyproject.toml: no [tool.setuptools.packages.find] include"
    return [p.strip().strip("\"'").rstrip("*") for p in m.group(1).split(",") if p.strip()]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def dockerfile_facts(text: str) -> dict[str, Any]:
    """ARG defaults, the resolved FROM, ENV, LABELs, WORKDIR, COPY sources and RUN lines."""
    facts: dict[str, Any] = {"args": {}, "env": {}, "labels": {}, "copies": [], "runs": [], "from": None,
                             "workdir": None}
    for word, rest in dockerfile_instructions(text):
        if word == "ARG":
            name, _, default = rest.partition("=")
            facts["args"][name.strip()] = default.strip().strip('"')
        elif word == "FROM":
            facts["from"] = re.sub(r"\$\{(\w+)\}", lambda m: facts["args"].get(m.group(1), m.group(0)), rest.split()[0])
        elif word in ("ENV", "LABEL"):
            for pair in shlex.split(rest):
                k, _, v = pair.partition("=")
                facts["env" if word == "ENV" else "labels"][k] = v
        elif word == "WORKDIR":
            facts["workdir"] = rest
        elif word == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            facts["copies"].extend(parts[:-1])
        elif word == "RUN":
            facts["runs"].append(rest)
    return facts


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kuberay_docs() -> list[tuple[str, dict]]:
    return [(f"{p.relative_to(ROOT)}", d) for p in sorted((DEPLOY / "kuberay").glob("*.yaml")) for d in load_yaml_docs(p)]


def cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """(role, pod spec) of every pod the resource creates: head, worker groups, job submitter."""
    cs = cluster_spec(doc)
    yield "head", cs["headGroupSpec"]["template"]["spec"]
    for g in cs.get("workerGroupSpecs", []):
        yield f"worker group {g['groupName']}", g["template"]["spec"]
    if "submitterPodTemplate" in doc["spec"]:
        yield "submitter", doc["spec"]["submitterPodTemplate"]["spec"]


def containers(doc: dict) -> Iterator[tuple[str, dict, dict]]:
    for role, pod in pod_specs(doc):
        for c in pod["containers"]:
            yield f"{role} container {c['name']}", c, pod


def container_env(c: dict) -> dict[str, Any]:
    """name → literal value, or ('secret', secret name, key)."""
    env: dict[str, Any] = {}
    for e in c.get("env", []):
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        env[e["name"]] = ("secret", ref["name"], ref["key"]) if ref else str(e.get("value", ""))
    return env


def docker_run_env(options: list[str]) -> tuple[dict[str, str], list[str]]:
    """`docker run` options of a `ray up` config → (--env vars, --volume specs)."""
    env, volumes = {}, []
    for opt in options:
        words = shlex.split(opt)
        for flag, value in zip(words, words[1:]):
            if flag in ("--env", "-e"):
                k, _, v = value.partition("=")
                env[k] = v
            elif flag in ("--volume", "-v"):
                volumes.append(value)
    return env, volumes


def ray_start_argv(commands: list[str]) -> list[list[str]]:
    """Every `ray start ...` in a list of shell command lines, as argv."""
    found = []
    for line in commands:
        for part in re.split(r"&&|;|\|\|", line):
            words = shlex.split(part)
            if words[:2] == ["ray", "start"]:
                found.append(words)
    return found


def cpu_quantity(q: Any) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def defines(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == name
               for n in tree.body)


def names_used(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
           {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}


FACTS = dockerfile_facts(DOCKERFILE.read_text())
IMAGE = f"flowers:{project_version()}"
APP_DIR = FACTS["workdir"]


# ----------------------------------------------------------------------------- checks


def check_entrypoint(argv: list[str], where: str) -> argparse.Namespace:
    """`python -m jobs.<name> ...`: a real job module with a main, flags its parser accepts, and
    for the study `--set` keys the study and trial configs know. Returns the parsed arguments."""
    assert argv[:2] == ["python", "-m"], f"{where}: entry point must be `python -m jobs.<name> ...`, got {argv[:3]}"
    module = argv[2]
    name = module.removeprefix("jobs.")
    assert module.startswith("jobs.") and name in ENTRYPOINTS, \
        f"{where}: '{module}' is not a job entry point (jobs.{{{','.join(ENTRYPOINTS)}}})"
    path = ROOT / "jobs" / f"{name}.py"
    assert path.is_file() and defines(path, "main"), f"{where}: {path.relative_to(ROOT)} has no main()"
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    PARSERS[name](parser)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv[3:])
    except SystemExit:
        raise AssertionError(f"{where}: python -m {module} refuses its arguments: "
                             f"{err.getvalue().strip().splitlines()[-1]}") from None
    if name == "study":
        check_study_settings(args, where)
    return args


def repo_path(path: str) -> Path:
    """A path as the job sees it: in the image (under WORKDIR) or relative to its working dir."""
    if APP_DIR and path.startswith(APP_DIR.rstrip("/") + "/"):
        rel = path[len(APP_DIR.rstrip("/")) + 1:]
        top = rel.split("/")[0]
        assert top in [c.rstrip("/").removeprefix("./") for c in FACTS["copies"]], \
            f"{path}: deploy/Dockerfile does not COPY '{top}' into {APP_DIR}"
        return ROOT / rel
    assert not Path(path).is_absolute(), f"{path}: an absolute path outside the image's {APP_DIR}"
    return ROOT / path


def check_study_settings(args: argparse.Namespace, where: str) -> None:
    """The study loads with these overrides, every trial config builds, and nothing it shares
    across nodes is a driver-local path."""
    try:
        study, config_dir = load_study(repo_path(args.config), args.profile, args.overrides)
        specs = build_trials(study, config_dir)
    except (ConfigError, OSError) as e:
        raise AssertionError(f"{where}: the study refuses its settings: {e}") from None
    assert study.storage_path and is_remote(study.storage_path), \
        f"{where}: --set study.storage_path=s3://... (Tune storage every node reaches), got {study.storage_path!r}"
    roots = {s.cfg.data.root for s in specs}
    assert len(roots) == 1 and is_remote(next(iter(roots))), \
        f"{where}: --set data.root=s3://... (a published dataset every node fetches), got {roots}"
    assert args.tracking_uri and args.tracking_uri.startswith(("http://", "https://")), \
        f"{where}: --tracking-uri must name an MLflow server, got {args.tracking_uri!r}"


def check_node_env(env: dict[str, Any], where: str) -> None:
    """What every Ray process needs from its start: the allocator setting and token auth."""
    for k, v in GLIBC_TUNING.items():
        assert env.get(k) == v, f"{where}: {k} must be {v} (flowers.runtime.GLIBC_TUNING), got {env.get(k)!r}"
    assert env.get("RAY_AUTH_MODE") == "token", f"{where}: RAY_AUTH_MODE must be token, got {env.get('RAY_AUTH_MODE')!r}"


def check_storage_env(env: dict[str, Any], where: str, tracking_uri: str | None = None) -> None:
    """Object storage endpoint and credentials (never literal), the MLflow server, the node cache."""
    assert any(env.get(k) for k in ENDPOINT_VARS), f"{where}: no S3 endpoint ({' or '.join(ENDPOINT_VARS)})"
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if k in env:
            assert isinstance(env[k], tuple) and env[k][0] == "secret", f"{where}: {k} must come from a Secret"
    assert str(env.get("MLFLOW_TRACKING_URI", "")).startswith(("http://", "https://")), \
        f"{where}: MLFLOW_TRACKING_URI must name the MLflow server"
    if tracking_uri:
        assert env["MLFLOW_TRACKING_URI"] == tracking_uri, \
            f"{where}: MLFLOW_TRACKING_URI {env['MLFLOW_TRACKING_URI']} differs from the entry point's {tracking_uri}"
    assert env.get("FLOWERS_CACHE"), f"{where}: FLOWERS_CACHE (node-local dataset cache) not set"


def check_serve_front(env: dict[str, Any], where: str) -> None:
    """Serve's HTTP front as serve/ingress_env.py builds it for serve/config.yaml's body limit."""
    body = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"][0]["args"]["max_body_bytes"]
    want = ingress_env("haproxy", body)
    for k in SERVE_FRONT:
        assert env.get(k) == want[k], f"{where}: {k} must be {want[k]} (serve/ingress_env.py), got {env.get(k)!r}"


def check_head(doc: dict, where: str) -> None:
    params = cluster_spec(doc)["headGroupSpec"].get("rayStartParams") or {}
    assert str(params.get("num-cpus")) == "0", f"{where}: head rayStartParams num-cpus must be \"0\", got {params.get('num-cpus')!r}"


def check_auth(doc: dict, where: str) -> None:
    """Token auth: the operator's authOptions and every container name the same Secret."""
    auth = cluster_spec(doc).get("authOptions") or {}
    assert auth.get("mode") == "token", f"{where}: authOptions.mode must be token (the operator talks to the head)"
    for role, c, _ in containers(doc):
        env = container_env(c)
        check_node_env(env, f"{where} {role}")
        assert env.get("RAY_AUTH_TOKEN") == ("secret", auth.get("secretName"), "auth_token"), \
            f"{where} {role}: RAY_AUTH_TOKEN must come from Secret {auth.get('secretName')!r}, key auth_token"


def check_cache_volume(c: dict, pod: dict, where: str) -> None:
    cache = container_env(c)["FLOWERS_CACHE"]
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    assert cache in mounts, f"{where}: FLOWERS_CACHE={cache} is not a mounted volume"
    vol = next(v for v in pod.get("volumes", []) if v["name"] == mounts[cache])
    assert "emptyDir" in vol or "hostPath" in vol, f"{where}: the cache volume should be node-local (emptyDir/hostPath)"


# ----------------------------------------------------------------------------- the image


def test_dockerfile_builds_the_project_on_rays_image():
    args, env = FACTS["args"], FACTS["env"]
    ray_version = importlib.metadata.version("ray")
    assert FACTS["from"] == f"rayproject/ray:{ray_version}-py311-cpu", \
        f"deploy/Dockerfile: FROM {FACTS['from']}; the project runs Ray {ray_version} (default variant cpu)"
    assert args.get("VARIANT") == "cpu", "deploy/Dockerfile: ARG VARIANT=cpu (gpu via --build-arg)"
    make = (ROOT / "Makefile").read_text()
    pins = dict(re.findall(r"\b(torch|torchvision)==([\w.+]+)", make))
    torch_run = next((r for r in FACTS["runs"] if "torch==" in r), "")
    assert dict(re.findall(r"\b(torch|torchvision)==([\w.+]+)", torch_run)) == pins, \
        f"deploy/Dockerfile: torch pins must equal the Makefile's {pins}"
    assert args.get("TORCH_INDEX_URL", "").endswith("/whl/cpu") and "TORCH_INDEX_URL" in torch_run, \
        "deploy/Dockerfile: torch from the CPU wheel index by default"
    assert any(re.search(r"""\bpip install (\S+ )*["']?\.(\[[\w,]+\])?["']?($|\s|&)""", r) for r in FACTS["runs"]), \
        "deploy/Dockerfile: no `pip install .`"
    copied = {c.rstrip("/").removeprefix("./") for c in FACTS["copies"]}
    for need in [*package_dirs(), "configs", "pyproject.toml", "README.md", "LICENSE"]:
        assert need in copied, f"deploy/Dockerfile: COPY {need} (pip install . or the jobs need it)"
    for k, v in GLIBC_TUNING.items():
        assert env.get(k) == v, f"deploy/Dockerfile: ENV {k}={v} (flowers.runtime.GLIBC_TUNING)"
    assert env.get("RAY_AUTH_MODE") == "token"
    assert "RAY_AUTH_TOKEN" not in env, "deploy/Dockerfile: never bake a token into the image"
    assert FACTS["labels"].get("org.opencontainers.image.version") == project_version()
    assert f"-t {IMAGE} " in DOCKERFILE.read_text(), f"deploy/Dockerfile: the build command should tag {IMAGE}"
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_one_image_and_ray_version_everywhere():
    images = {(where, c["image"]) for where, d in kuberay_docs() for _, c, _ in containers(d)}
    images.add((str(RAY_CLUSTER.relative_to(ROOT)), yaml.safe_load(RAY_CLUSTER.read_text())["docker"]["image"]))
    assert {img for _, img in images} == {IMAGE}, f"every node runs {IMAGE} (pyproject version): {sorted(images)}"
    for where, d in kuberay_docs():
        assert cluster_spec(d)["rayVersion"] == FACTS["args"]["RAY_VERSION"], f"{where}: rayVersion != the image's Ray"


# ----------------------------------------------------------------------------- KubeRay


def rayjobs() -> list[tuple[str, dict]]:
    docs = [(w, d) for w, d in kuberay_docs() if d["kind"] == "RayJob"]
    assert docs, "deploy/kuberay: no RayJob"
    return docs


def test_parser_builders_are_the_jobs_own():
    for name in ENTRYPOINTS:
        assert name in PARSERS, f"jobs.{name} is an entry point this test cannot parse: add its builder to PARSERS"
        assert BUILDER_NAMES[name] in names_used(ROOT / "jobs" / f"{name}.py"), \
            f"jobs/{name}.py no longer builds its parser with {BUILDER_NAMES[name]}"


def test_rayjob_entrypoint_runs_the_study_with_shared_storage():
    for where, doc in rayjobs():
        args = check_entrypoint(shlex.split(doc["spec"]["entrypoint"]), where)
        assert doc["spec"]["entrypoint"].split()[2] == "jobs.study"
        assert doc["spec"].get("shutdownAfterJobFinishes") is True, f"{where}: shutdownAfterJobFinishes: true"
        if doc["spec"].get("backoffLimit", 0) > 0:
            assert args.resume, f"{where}: a retried submission must continue the study: add --resume"
        for role, c, pod in containers(doc):
            env = container_env(c)
            check_storage_env(env, f"{where} {role}", args.tracking_uri)
            if not role.startswith("submitter"):
                check_cache_volume(c, pod, f"{where} {role}")


def test_every_container_has_the_allocator_and_the_token():
    for where, doc in kuberay_docs():
        check_auth(doc, where)
        check_head(doc, where)


def test_study_concurrency_fits_the_worker_group():
    for where, doc in rayjobs():
        args = check_entrypoint(shlex.split(doc["spec"]["entrypoint"]), where)
        study, _ = load_study(repo_path(args.config), args.profile, args.overrides)
        cpus = sum(g["replicas"] * cpu_quantity((g.get("rayStartParams") or {}).get("num-cpus")
                                                 or g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
                   for g in cluster_spec(doc)["workerGroupSpecs"])
        need = study.resources.max_concurrent * study.resources.cpus_per_trial
        assert need <= cpus, f"{where}: {study.resources.max_concurrent} trials x {study.resources.cpus_per_trial} CPU " \
                             f"need {need} CPUs, the workers have {cpus}"


def test_rayservice_serves_the_projects_serve_config():
    docs = [(w, d) for w, d in kuberay_docs() if d["kind"] == "RayService"]
    for where, doc in docs:
        served = yaml.safe_load(doc["spec"]["serveConfigV2"])
        local = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
        assert served["http_options"]["host"] == "0.0.0.0", f"{where}: Serve must listen on the pod IP"
        served["http_options"]["host"] = local["http_options"]["host"]
        assert served == local, f"{where}: serveConfigV2 drifted from serve/config.yaml"
        for app in served["applications"]:
            module, _, attr = app["import_path"].partition(":")
            assert defines(ROOT / (module.replace(".", "/") + ".py"), attr), f"{where}: {app['import_path']} not found"
        for role, c, _ in containers(doc):
            env = container_env(c)
            check_serve_front(env, f"{where} {role}")
            assert str(env.get("MLFLOW_TRACKING_URI", "")).startswith("http"), f"{where} {role}: MLFLOW_TRACKING_URI"


# ----------------------------------------------------------------------------- ray up


def test_ray_up_config_matches_rays_schema():
    import jsonschema  # installed with ray (a dependency of it)
    import ray.autoscaler  # the schema ships as a data file next to the autoscaler package

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load(RAY_CLUSTER.read_text()), schema)


def test_ray_up_nodes_get_the_same_setup():
    cfg = yaml.safe_load(RAY_CLUSTER.read_text())
    where = str(RAY_CLUSTER.relative_to(ROOT))
    env, volumes = docker_run_env(cfg["docker"]["run_options"])
    check_node_env(env, where)
    check_storage_env(env, where)
    check_serve_front(env, where)
    assert any(v.split(":")[1] == env["FLOWERS_CACHE"] for v in volumes), f"{where}: mount a host folder at FLOWERS_CACHE"
    assert any(t.endswith("/.ray/auth_token") for t in cfg["file_mounts"]), f"{where}: copy the token to the nodes"
    assert not any(k.startswith("AWS_SECRET") or k == "RAY_AUTH_TOKEN" for k in env), f"{where}: no secrets inline"
    heads, workers = ray_start_argv(cfg["head_start_ray_commands"]), ray_start_argv(cfg["worker_start_ray_commands"])
    assert heads and all("--head" in a and "--num-cpus=0" in a for a in heads), f"{where}: ray start --head --num-cpus=0"
    assert workers and all(any(w.startswith("--address=") for w in a) for a in workers), f"{where}: workers join the head"


# ----------------------------------------------------------------------------- docs/cluster.md


def doc_commands() -> list[str]:
    """Shell lines of the bash blocks in docs/cluster.md from "On a real cluster" on."""
    text = CLUSTER_DOC.read_text()
    assert DOC_SECTION in text, f"docs/cluster.md: no '{DOC_SECTION}' section"
    text = text[text.index(DOC_SECTION):]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_docs_commands_parse():
    from flowers.cli.main import build_parser

    checked = 0
    for line in doc_commands():
        words = shlex.split(line, comments=True)
        if words[:1] == ["flowers"]:
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    args = build_parser().parse_args(words[1:])
            except SystemExit:
                raise AssertionError(f"docs/cluster.md: `{line}` fails: {err.getvalue().strip()}") from None
            if args.command == "submit":
                check_entrypoint(["python", "-m", f"jobs.{args.job}", *args.args], f"docs/cluster.md `{line}`")
            checked += 1
        elif "python" in words and words[words.index("python") + 1:][:1] == ["-m"]:
            i = words.index("python")
            if words[i + 2].startswith("jobs."):
                check_entrypoint(words[i:], f"docs/cluster.md `{line}`")
                checked += 1
    assert checked >= 2, "docs/cluster.md: expected the `flowers data publish` and `flowers submit study` commands"


# ----------------------------------------------------------------------------- the checks can fail


def _rayjob() -> dict:
    return copy.deepcopy(rayjobs()[0][1])


@pytest.mark.parametrize("change, message", [
    (lambda e: e.replace("jobs.study", "jobs.studies"), "not a job entry point"),
    (lambda e: e.replace("--profile", "--profiles"), "refuses its arguments"),
    (lambda e: e + " --set study.storage_pth=s3://x/y", "refuses its settings"),
    (lambda e: e + " --set data.rooot=s3://x/y", "refuses its settings"),
    (lambda e: e.replace("study.storage_path=s3://", "study.storage_path=/mnt/"), "study.storage_path"),
    (lambda e: e.replace("data.root=s3://", "data.root=/data/"), "data.root"),
])
def test_entrypoint_check_catches_drift(change, message):
    entry = change(_rayjob()["spec"]["entrypoint"])
    with pytest.raises(AssertionError, match=message):
        check_entrypoint(shlex.split(entry), "altered RayJob")


def test_env_and_head_checks_catch_drift():
    doc = _rayjob()
    env = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "MALLOC_MMAP_THRESHOLD_")["value"] = "65536"
    with pytest.raises(AssertionError, match="MALLOC_MMAP_THRESHOLD_"):
        check_auth(doc, "altered RayJob")
    doc = _rayjob()
    for e in cluster_spec(doc)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]:
        if e["name"] == "RAY_AUTH_MODE":
            e["value"] = "disabled"
    with pytest.raises(AssertionError, match="RAY_AUTH_MODE"):
        check_auth(doc, "altered RayJob")
    doc = _rayjob()
    cluster_spec(doc)["headGroupSpec"]["rayStartParams"]["num-cpus"] = "2"
    with pytest.raises(AssertionError, match="num-cpus"):
        check_head(doc, "altered RayJob")
    with pytest.raises(AssertionError, match="RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"):
        check_serve_front({"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                           "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": "4194304"}, "altered env")
