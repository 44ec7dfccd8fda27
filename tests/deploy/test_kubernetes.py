"""deploy/kubernetes (CPU, offline): every overlay renders, every resource validates strictly against the
Kubernetes 1.35 schemas (resource.k8s.io/v1 included), and the engine pod keeps its invariants: one DRA claim
and one socket volume shared by the memory sidecars and both engines, a pair of `--standby` memory services per
GPU, ports and probes that match the flags and real routes, and only flags that `understudy <cmd> --help` lists.

The overlays use kustomize's resources, patches (strategic merge by name) and a configMapGenerator only;
`render` below applies exactly those. Where `kubectl` is installed its `kubectl kustomize` must agree."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.deploy.cli_flags import invocations, shell_words, unknown_flags

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
TARGETS = {"base": KUBE / "base", "etcd": KUBE / "overlays" / "etcd", "tp2": KUBE / "overlays" / "tp2"}
K8S_VERSION = "1.35.0"  # resource.k8s.io/v1 (DRA) is GA from 1.34


def load_docs(path: Path) -> list[dict]:
    # Through JSON: YAML anchors (shared objects) become separate copies that patches may change one by one.
    return [json.loads(json.dumps(d)) for d in yaml.safe_load_all(path.read_text()) if d]


def merge(into: dict, patch: dict) -> None:
    """Strategic merge as kustomize does it for what our patches touch: maps merge, lists of named items merge
    by name (the patch's items first, in its order, then the others), other values are replaced."""
    for key, value in patch.items():
        old = into.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            merge(old, value)
        elif (isinstance(old, list) and isinstance(value, list) and value
              and all(isinstance(v, dict) and "name" in v for v in old + value)):
            by_name = {v["name"]: v for v in old}
            for v in value:
                if v["name"] in by_name:
                    merge(by_name[v["name"]], v)
            patched = [by_name.get(v["name"], v) for v in value]
            into[key] = patched + [v for v in old if v["name"] not in {p["name"] for p in value}]
        else:
            into[key] = value


def render(directory: Path) -> list[dict]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(k) <= {"apiVersion", "kind", "resources", "patches", "configMapGenerator"}, \
        f"{directory}: a kustomize feature render() does not apply: {set(k)}"
    docs: list[dict] = []
    for r in k.get("resources", []):
        path = directory / r
        docs += render(path) if path.is_dir() else load_docs(path)
    for gen in k.get("configMapGenerator", []):
        assert gen["options"]["disableNameSuffixHash"], "a name hash would make the ConfigMap's name unstable"
        docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": gen["name"], "labels": gen["options"]["labels"]},
                     "data": {Path(f).name: (directory / f).read_text() for f in gen["files"]}})
    for patch in k.get("patches", []):
        for doc in load_docs(directory / patch["path"]):
            [target] = [d for d in docs if (d["kind"], d["metadata"]["name"]) == (doc["kind"], doc["metadata"]["name"])]
            merge(target, doc)
    return docs


def by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.fixture(scope="module", params=sorted(TARGETS))
def target(request) -> tuple[str, dict[tuple[str, str], dict]]:
    return request.param, by_kind(render(TARGETS[request.param]))


def test_every_resource_validates_strictly(target):
    name, docs = target
    assert docs
    for (kind, res), doc in docs.items():
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {kind}/{res}: {e.message} at {list(e.path)}")


def test_a_typo_fails_validation():
    """The validation above can fail: an unknown field and a wrong type are refused."""
    docs = by_kind(render(TARGETS["base"]))
    pod = docs["Deployment", "understudy-engine"]
    bad = json.loads(json.dumps(pod))
    bad["spec"]["template"]["spec"]["containers"][0]["resources"]["claim"] = [{"name": "gpu"}]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: render() alone is checked")
def test_kubectl_kustomize_agrees_with_render():
    for name, directory in TARGETS.items():
        out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True)
        assert by_kind([d for d in yaml.safe_load_all(out.stdout) if d]) == by_kind(render(directory)), name


def engine_pod(docs) -> dict:
    return docs["Deployment", "understudy-engine"]["spec"]["template"]["spec"]


def env_of(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def expand(word: str, env: dict) -> str:
    """Kubernetes' expansion of command, args and exec probes: $(VAR) is VAR's value where the container
    defines it (else left as is), $$ is $."""
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env[m.group(1)] if env.get(m.group(1)) is not None else m.group(0)

    return re.sub(r"\$\$|\$\((\w+)\)", one, word)


def words_of(container: dict) -> list[str]:
    """A container's command line as the shell would see it: `sh -c SCRIPT NAME ARGS` is the script's words
    with "$@" replaced by the args."""
    env = env_of(container)
    command, args = container.get("command", []), container.get("args", [])
    if command[:2] == ["sh", "-c"]:
        words = shell_words(command[2])
        at = words.index("$@")
        return [expand(w, env) for w in words[:at] + args + words[at + 1:]]
    return [expand(w, env) for w in command + args]


def flag(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def test_sidecar_and_engines_share_one_claim_and_the_socket_volume(target):
    name, docs = target
    pod = engine_pod(docs)
    memories, engines = pod["initContainers"], pod["containers"]
    assert [c["name"] for c in engines] == ["engine-a", "engine-b"]
    assert all(c["restartPolicy"] == "Always" for c in memories), "memory services are native sidecars"
    [claim] = pod["resourceClaims"]
    template = docs["ResourceClaimTemplate", claim["resourceClaimTemplateName"]]
    [request] = template["spec"]["spec"]["devices"]["requests"]
    for c in memories + engines:
        assert c["resources"]["claims"] == [{"name": claim["name"]}], c["name"]
        assert c["volumeMounts"] == memories[0]["volumeMounts"], c["name"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    run = next(m for m in memories[0]["volumeMounts"] if m["name"] == "run")
    assert volumes["run"] == {"name": "run", "emptyDir": {}}
    # Every process finds the memory services and the failover lock in the shared volume.
    for c in memories + engines:
        assert flag(words_of(c), "--socket-dir") == run["mountPath"], c["name"]
    # Two memory sidecars per GPU of the claim, both `--standby`: whichever dies, the other takes over and the
    # restarted one parks (without the flag it would exit: "a live memory server already serves"). Each engine
    # is a group over all the GPUs.
    devices = sorted(int(flag(words_of(m), "--device")) for m in memories)
    assert devices == sorted(2 * list(range(request["exactly"]["count"])))
    assert all("--standby" in words_of(m) for m in memories)
    devices = sorted(set(devices))
    for c in engines:
        assert int(flag(words_of(c), "--tensor-parallel")) == len(devices), c["name"]
        assert flag(words_of(c), "--device") == "0" and flag(words_of(c), "--backend") == "cuda"
    print(f"{name}: {len(memories)} memory sidecars, {len(engines)} engines, claim of {len(devices)} GPU(s)")


def routes(module: str) -> set[str]:
    source = (ROOT / "src" / "understudy" / module).read_text()
    return set(re.findall(r'@app\.(?:get|post|put|delete)\("([^"]+)"', source))


def test_ports_probes_and_roles(target):
    _, docs = target
    pod = engine_pod(docs)
    engine_routes = routes("engine/serving/app.py")
    ports = set()
    roles = []
    for c in pod["containers"]:
        words = words_of(c)
        port = int(flag(words, "--port"))
        ports.add(port)
        assert [p["containerPort"] for p in c["ports"]] == [port]
        assert flag(words, "--host") == "0.0.0.0"
        assert flag(words, "--advertise-url").endswith(f":{port}")
        for probe, path in (("startupProbe", "/live"), ("livenessProbe", "/live"), ("readinessProbe", "/health")):
            assert c[probe]["httpGet"] == {"path": path, "port": port}, (c["name"], probe)
            assert path in engine_routes
        roles.append(flag(words, "--role"))
        # SIGTERM drains within --drain-timeout; kubelet must not SIGKILL before.
        assert pod["terminationGracePeriodSeconds"] > float(flag(words, "--drain-timeout"))
    assert len(ports) == 2 and roles == ["$role", "$role"]
    assert [env_of(c)["UNDERSTUDY_ROLE"] for c in pod["containers"]] == ["primary", "shadow"]
    metrics_ports = []
    for m in pod["initContainers"]:
        words = words_of(m)
        metrics = int(flag(words, "--metrics-port"))
        metrics_ports.append(metrics)
        assert flag(words, "--metrics-host") == "0.0.0.0"
        assert [p["containerPort"] for p in m["ports"]] == [metrics]
        # A parked standby listens nowhere (no socket, no /metrics) until it takes over: the probes find the
        # container's process through the pid file its command writes and look it up in /proc/locks
        # (test_kubernetes_pod.py runs them); the liveness probe asks the metrics port the service uses.
        pidfile = flag(words, ">")
        assert words[words.index(">") - 2:words.index(">")] == ["echo", "$$"], words
        for probe in ("startupProbe", "livenessProbe"):
            script = " ".join(m[probe]["exec"]["command"])
            assert f"$(cat {pidfile})" in script and "/proc/locks" in script, (m["name"], probe)
        assert env_of(m)["UNDERSTUDY_METRICS_PORT"] == str(metrics)
        assert "$UNDERSTUDY_METRICS_PORT/metrics" in " ".join(m["livenessProbe"]["exec"]["command"])
    assert len(set(metrics_ports)) == len(metrics_ports), metrics_ports
    assert not set(metrics_ports) & ports


def test_engines_register_where_the_frontend_listens(target):
    name, docs = target
    pod = engine_pod(docs)
    fe = docs["Deployment", "understudy-frontend"]["spec"]["template"]["spec"]
    [frontend] = fe["containers"]
    fwords = words_of(frontend)
    fport = int(flag(fwords, "--port"))
    assert [p["containerPort"] for p in frontend["ports"]] == [fport]
    frontend_routes = routes("frontend/app.py")
    assert frontend["livenessProbe"]["httpGet"] == {"path": "/live", "port": fport} and "/live" in frontend_routes
    assert frontend["readinessProbe"]["httpGet"] == {"path": "/health", "port": fport} and "/health" in frontend_routes
    assert fe["terminationGracePeriodSeconds"] > float(flag(fwords, "--drain-timeout"))
    discovery = flag(fwords, "--discovery")
    # One admin token for the operator routes the frontend calls on the engines (and registration).
    tokens = [next(e["valueFrom"]["secretKeyRef"] for e in c["env"] if e["name"] == "UNDERSTUDY_ADMIN_TOKEN")
              for c in pod["containers"] + [frontend]]
    assert all(t == tokens[0] for t in tokens), tokens
    for c in pod["containers"]:
        register = flag(words_of(c), "--register")
        if discovery == "embedded":
            service = re.fullmatch(r"http://([\w-]+):(\d+)", register)
            svc = docs["Service", service.group(1)]["spec"]
            assert svc["publishNotReadyAddresses"] is True  # engines register before any frontend is ready
            [port] = svc["ports"]
            assert port["port"] == int(service.group(2)) and port["targetPort"] == frontend["ports"][0]["name"]
            assert svc["selector"] == docs["Deployment", "understudy-frontend"]["spec"]["selector"]["matchLabels"]
            assert docs["Deployment", "understudy-frontend"]["spec"]["replicas"] == 1, \
                "the embedded registry lives in one frontend process"
        else:
            assert register == discovery, name
            host, port = re.fullmatch(r"etcd://([\w-]+):(\d+)", discovery).groups()
            assert docs["Service", host]["spec"]["ports"][0]["port"] == int(port)


def test_only_flags_that_help_lists(target):
    name, docs = target
    checked = []
    for (kind, _), doc in docs.items():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            words = words_of(c)
            for hook in ("postStart", "preStop"):
                if hook in c.get("lifecycle", {}):
                    words += shell_words(" ".join(c["lifecycle"][hook]["exec"]["command"][2:]))
            assert unknown_flags(words) == [], (name, c["name"])
            checked += [cmd for cmd, _ in invocations(words)]
    assert sorted(set(checked)) == ["frontend", "memory-server", "serve"]


def test_the_dashboard_configmap_is_the_dashboard_file():
    docs = by_kind(render(TARGETS["base"]))
    cm = docs["ConfigMap", "understudy-grafana-dashboard"]
    path = ROOT / "deploy" / "grafana" / "understudy.json"
    assert cm["data"] == {"understudy.json": path.read_text()}
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_dashboard_queries_name_real_metrics():
    dash = json.loads((ROOT / "deploy" / "grafana" / "understudy.json").read_text())
    source = "\n".join(p.read_text() for p in (ROOT / "src" / "understudy").rglob("*metrics.py"))
    defined = set(re.findall(r'"(understudy_[a-z_]+)"', source))
    used = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"understudy_[a-z_]+", t["expr"])}
    suffixes = ("_total", "_bucket", "_count", "_sum")
    unknown = {m for m in used if m not in defined and not any(m.endswith(s) and m[: -len(s)] in defined
                                                                 for s in suffixes)}
    assert unknown == set()
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for want in ("state", "failover", "first token", "inter-token", "kv", "migration", "shed"):
        assert want in titles, want


@pytest.mark.parametrize("host", ["0.0.0.0", None])
def test_memory_metrics_listen_where_the_sidecar_says(socket_dir, host):
    """The sidecar's `--metrics-host 0.0.0.0` makes the memory service's metrics reachable from outside the
    pod (any address of it: 127.0.0.2 stands for the pod IP); the default listens on 127.0.0.1 only."""
    import httpx

    from tests.helpers.procs import BACKEND, ServerProcess, free_port

    port = free_port()
    srv = ServerProcess.start(BACKEND, socket_dir, "--metrics-port", str(port),
                              *(["--metrics-host", host] if host else []))
    try:
        assert "understudy_memory_bytes_in_use" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
        if host == "0.0.0.0":
            assert "understudy_memory_bytes_in_use" in httpx.get(f"http://127.0.0.2:{port}/metrics").text
        else:
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://127.0.0.2:{port}/metrics")
    finally:
        srv.stop()
