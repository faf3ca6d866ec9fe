"""The charts agree with the binaries they run: every flag and environment variable they set is
one the binary accepts and reads, the ports, probes and scrape annotations are the ones the
binaries serve, and the RBAC rules are exactly what the Kubernetes code lists, watches and writes.

The binaries are the debug builds (`cargo build --workspace --bins`), run for real: in a private
network and mount namespace (unshare), so their default listen addresses and host paths touch
nothing outside the test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tempfile

import pytest

from conftest import REPO, binary, container, pod_spec, render

# --------------------------------------------------------------------------------------------
# What the Kubernetes code uses, read from the Rust source.


def _source(path: str) -> str:
    return (REPO / path).read_text()


def kind_specs() -> dict[str, tuple[str, str]]:
    """Every `const NAME: KindSpec` of the workspace: NAME -> (API group, plural)."""
    specs = {}
    for path in ["crates/kube/src/watch.rs", "istiod-lite/src/source.rs",
                 "istiod-lite/src/waypoint_controller.rs"]:
        for m in re.finditer(
            r"const (\w+): KindSpec = KindSpec \{\s*api_version: \"([^\"]+)\",.*?plural: \"(\w+)\"",
            _source(path), re.S,
        ):
            name, api_version, plural = m.groups()
            group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
            specs[name] = (group, plural)
    assert len(specs) >= 14, f"KindSpec constants not found (source layout changed?): {specs}"
    return specs


def _names(block: str) -> list[str]:
    return re.findall(r"\b([A-Z][A-Z_]+)\b", block)


def watched_kinds() -> set[tuple[str, str]]:
    """istiod-lite's config source: `CONTROL_PLANE_KINDS` plus what `watched_kinds()` adds."""
    specs = kind_specs()
    control = re.search(r"CONTROL_PLANE_KINDS: &\[KindSpec\] = &\[(.*?)\];",
                        _source("crates/kube/src/watch.rs"), re.S)
    assert control, "CONTROL_PLANE_KINDS not found"
    body = re.search(r"pub fn watched_kinds\(\).*?\n\}", _source("istiod-lite/src/source.rs"), re.S)
    assert body, "watched_kinds() not found"
    names = _names(control.group(1)) + re.findall(r"kinds\.push\((\w+)\)", body.group(0))
    return {specs[n] for n in names}


def controller_kinds() -> tuple[set, set, set]:
    """The waypoint controller: (watched, applied with server-side apply, status patched)."""
    src = _source("istiod-lite/src/waypoint_controller.rs")
    specs = kind_specs()
    watches = re.search(r"pub fn watches\(\).*?\n\}", src, re.S).group(0)
    watched = set(re.findall(r"^\s+([A-Z_]+),$", watches, re.M))
    watched |= set(re.findall(r"kind: ([A-Z_]+),", watches))
    applied = re.search(r"for \(kind, object\) in \[(.*?)\]", src, re.S).group(1)
    applied_names = set(re.findall(r"\(([A-Z_]+),", applied))
    status = set(re.findall(r"status_patch\(\s*([A-Z_]+),", src))
    routes = re.search(r"for \(kind, spec\) in \[(.*?)\]", src).group(1)
    status |= set(re.findall(r"\"\w+\", ([A-Z_]+)\)", routes))
    assert applied_names and status and watched, (watched, applied_names, status)
    return ({specs[n] for n in watched}, {specs[n] for n in applied_names},
            {specs[n] for n in status})


def expected_istiod_rules(controller: bool) -> tuple[set, set]:
    """(cluster-wide, system-namespace) rules as (group, resource, verb) triples."""
    cluster = {(g, r, v) for g, r in watched_kinds() for v in ("list", "watch")}
    # The CA (istiod-lite/src/kube_ca.rs, auth.rs): root ConfigMaps read, created and patched in
    # every namespace (watched by name); callers' tokens reviewed; the CA's own Secret.
    ca = _source("istiod-lite/src/kube_ca.rs")
    for evidence in ["Api<ConfigMap>", "get_opt(ROOT_CONFIGMAP)", ".patch(", "api.create(",
                     "Api::<ConfigMap>::all", "Api<Secret>", "secrets.create(", ".get_opt(name)"]:
        assert evidence in ca, f"kube_ca.rs no longer has {evidence!r}: update the RBAC test"
    assert "Api<TokenReview>" in _source("istiod-lite/src/auth.rs")
    cluster |= {("", "configmaps", v) for v in ("get", "list", "watch", "create", "patch")}
    cluster.add(("authentication.k8s.io", "tokenreviews", "create"))
    namespaced = {("", "secrets", "get"), ("", "secrets", "create")}
    if controller:
        watched, applied, status = controller_kinds()
        cluster |= {(g, r, v) for g, r in watched for v in ("list", "watch")}
        # Server-side apply: patch, and create when the object does not exist yet.
        cluster |= {(g, r, v) for g, r in applied for v in ("create", "patch")}
        cluster |= {(g, f"{r}/status", "patch") for g, r in status}
    return cluster, namespaced


def rule_triples(role: dict) -> set:
    out = set()
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    assert "*" not in (g, r, v), f"wildcard in {role['metadata']['name']}"
                    out.add((g, r, v))
    return out


@pytest.mark.parametrize("values", [None, "no-waypoint-controller"])
def test_istiod_rbac_is_exactly_what_the_code_uses(values):
    from conftest import CHARTS_DIR

    r = render("istiod-lite", str(CHARTS_DIR / "istiod-lite/examples" / f"{values}.yaml")
               if values else None)
    controller = values is None
    cluster, namespaced = expected_istiod_rules(controller)
    assert rule_triples(r.one("ClusterRole")) == cluster
    assert rule_triples(r.one("Role")) == namespaced
    # Both bound to the account the Deployment runs as.
    account = pod_spec(r.one("Deployment"))["serviceAccountName"]
    for binding in r.of_kind("ClusterRoleBinding") + r.of_kind("RoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": "istio-system"}
        ]
    assert {b["roleRef"]["name"] for b in r.of_kind("ClusterRoleBinding")} == {
        r.one("ClusterRole")["metadata"]["name"]}


def test_cni_rbac_is_exactly_what_the_agent_uses():
    src = _source("cni/src/agent/kubernetes.rs")
    # Pods of its node and all namespaces are listed and watched; a pod or namespace the watch
    # has not delivered is read with get; captured pods are annotated with a merge patch.
    for evidence in ["api.get(name)", "api.get(namespace)", "api.patch(", "spec.nodeName="]:
        assert evidence in src, f"cni agent no longer has {evidence!r}: update the RBAC test"
    expected = {("", "pods", v) for v in ("get", "list", "watch", "patch")}
    expected |= {("", "namespaces", v) for v in ("get", "list", "watch")}
    r = render("cni", None)
    assert rule_triples(r.one("ClusterRole")) == expected


# --------------------------------------------------------------------------------------------
# Flags: istiod-lite and cni-agent (clap).


def help_flags(*argv: str) -> dict[str, str]:
    """`--flag` -> its help paragraph, from the binary's own --help."""
    out = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=30, check=True)
    flags = {}
    for m in re.finditer(r"^\s+(?:-\w, )?(--[a-z0-9-]+)(.*?)(?=^\s+-|\Z)", out.stdout, re.M | re.S):
        flags[m.group(1)] = m.group(2)
    assert flags, out.stdout
    return flags


def default_of(help_text: str) -> str:
    m = re.search(r"\[default: ([^\]]+)\]", help_text)
    assert m, help_text
    return m.group(1)


def flag_names(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


@pytest.mark.parametrize("values", [None, "production", "no-waypoint-controller"])
def test_istiod_flags_are_accepted(values, tmp_path):
    from conftest import CHARTS_DIR

    r = render("istiod-lite", str(CHARTS_DIR / "istiod-lite/examples" / f"{values}.yaml")
               if values else None)
    deployment = r.one("Deployment", "istiod")
    c = container(deployment, "discovery")
    exe = str(binary("istiod-lite"))
    flags = help_flags(exe)
    for name in flag_names(c["args"]):
        assert name in flags, f"istiod-lite does not accept {name}"
    # Run with exactly the chart's arguments: they parse (clap exits 2 on a bad flag or value),
    # and istiod-lite goes on to look for the API server, which this test does not have.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    env.update({e["name"]: e["value"] for e in c["env"]})
    done = subprocess.run([exe, *c["args"]], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1, done.stderr
    assert "connecting to the Kubernetes API server" in done.stderr, done.stderr
    # RUST_LOG is the one variable it reads (through ambit-core's logging).
    assert [e["name"] for e in c["env"]] == ["RUST_LOG"]
    assert 'std::env::var("RUST_LOG")' in _source("crates/core/src/logging.rs")


def test_istiod_ports_probe_and_scrape_match_the_binary():
    r = render("istiod-lite", None)
    deployment = r.one("Deployment", "istiod")
    c = container(deployment, "discovery")
    flags = help_flags(str(binary("istiod-lite")))
    listen = int(default_of(flags["--listen"]).rsplit(":", 1)[1])
    monitoring = int(default_of(flags["--monitoring"]).rsplit(":", 1)[1])
    assert (listen, monitoring) == (15012, 15014)
    args = dict(a.split("=", 1) for a in c["args"] if "=" in a)
    assert args["--listen"].endswith(f":{listen}") and args["--monitoring"].endswith(f":{monitoring}")
    assert {p["containerPort"] for p in c["ports"]} == {listen, monitoring}
    service = r.one("Service", "istiod")
    assert {(p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        (listen, listen), (monitoring, monitoring)}
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    probe = c["readinessProbe"]["httpGet"]
    assert (probe["port"], probe["path"]) == (monitoring, "/ready")
    ann = deployment["spec"]["template"]["metadata"]["annotations"]
    assert (ann["prometheus.io/port"], ann["prometheus.io/path"]) == (str(monitoring), "/metrics")
    # The paths exist in the binary (the monitoring handler's routes).
    main = _source("istiod-lite/src/main.rs")
    assert '"/metrics" =>' in main and '"/ready" =>' in main
    # ztunnel's default control plane is this Service.
    assert args["--waypoint-xds-address"] == "https://istiod.istio-system.svc:15012"
    assert deployment["spec"]["template"]["metadata"]["labels"]["app"] == "istiod"


def test_cni_flags_are_accepted_and_install_works(tmp_path):
    r = render("cni", None)
    ds = r.one("DaemonSet", "ambit-cni-node")
    exe = str(binary("cni-agent"))
    install = container(ds, "install-cni")
    run = container(ds, "cni-agent")
    assert install["command"] == run["command"] == ["/usr/local/bin/cni-agent"]
    install_flags = help_flags(exe, "install")
    for name in flag_names(install["args"][1:]):
        assert name in install_flags, f"cni-agent install does not accept {name}"
    run_flags = help_flags(exe, "run")
    for name in flag_names(run["args"][1:]):
        assert name in run_flags, f"cni-agent run does not accept {name}"
    assert "[env: NODE_NAME=]" in run_flags["--node"]
    assert [e["name"] for e in run["env"]] == ["NODE_NAME", "RUST_LOG"]

    # Run the install container's command for real against a node's directories (the /host
    # mounts mapped into tmp_path), with a primary plugin's conflist already there.
    mounts = {m["mountPath"]: m["name"] for m in install["volumeMounts"]}
    host = {v["name"]: v["hostPath"]["path"] for v in pod_spec(ds)["volumes"] if "hostPath" in v}
    assert host[mounts["/host/opt/cni/bin"]] == "/opt/cni/bin"
    assert host[mounts["/host/etc/cni/net.d"]] == "/etc/cni/net.d"
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    bin_dir.mkdir()
    conf_dir.mkdir()
    (conf_dir / "10-bridge.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"}]}))
    args = [a.replace("/host/opt/cni/bin", str(bin_dir)).replace("/host/etc/cni/net.d", str(conf_dir))
            for a in install["args"]]
    done = subprocess.run([exe, *args, f"--plugin={binary('ambit-cni')}"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (bin_dir / "ambit-cni").is_file()
    conflist = json.loads((conf_dir / "10-bridge.conflist").read_text())
    entry = conflist["plugins"][-1]
    assert entry["type"] == "ambit-cni"
    # The plugin, run by the runtime on the node, finds the agent where the agent listens.
    run_args = dict(a.split("=", 1) for a in run["args"] if "=" in a)
    assert entry["agentSocket"] == run_args["--plugin-socket"]
    assert entry["failClosed"] is True
    agent_mounts = {m["mountPath"] for m in run["volumeMounts"]}
    assert os.path.dirname(run_args["--plugin-socket"]) in agent_mounts
    assert host["ambit-run"] == "/var/run/ambit" and run_args["--state-dir"] == "/var/run/ambit"
    # The agent's ZDS socket is where ztunnel's chart looks for it, on the same host path.
    zt = render("ztunnel", None).one("DaemonSet", "ztunnel")
    zt_env = {e["name"]: e.get("value") for e in container(zt, "istio-proxy")["env"]}
    assert zt_env["INPOD_UDS"] == run_args["--zds-socket"]
    zt_host = {v["name"]: v["hostPath"]["path"] for v in pod_spec(zt)["volumes"] if "hostPath" in v}
    assert os.path.dirname(run_args["--zds-socket"]) in zt_host.values()
    assert os.path.dirname(run_args["--zds-socket"]) in host.values()


def test_cni_agent_starts_with_the_chart_arguments(tmp_path):
    """`cni-agent run` with the chart's arguments parses them and gets as far as the API server
    (isolated: its sockets and nftables table go to private namespaces)."""
    ds = render("cni", None).one("DaemonSet", "ambit-cni-node")
    run = container(ds, "cni-agent")
    argv = [str(binary("cni-agent")), *run["args"]]
    script = f"""
        mount -t tmpfs tmpfs /run
        ip link set lo up
        exec {shlex.join(argv)}
    """
    done = isolated(script, {"NODE_NAME": "node-1", "RUST_LOG": "info", "HOME": str(tmp_path)},
                    timeout=60)
    assert done.returncode not in (0, 2), done.stderr
    assert "unexpected argument" not in done.stderr and "invalid value" not in done.stderr
    assert "connecting to the Kubernetes API server" in done.stderr, done.stderr


# --------------------------------------------------------------------------------------------
# Environment: ztunnel (and the values the chart gives it), run for real.


def isolated(script: str, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """Runs a shell script in new network and mount namespaces (as root, or as a mapped root
    in a new user namespace for a contributor without root)."""
    prefix = ["unshare", "--mount", "--net", "--propagation", "private"]
    if os.geteuid() != 0:
        prefix[1:1] = ["--user", "--map-root-user"]
    full = {"PATH": os.environ["PATH"], **env}
    try:
        return subprocess.run([*prefix, "sh", "-ec", script], capture_output=True, text=True,
                              timeout=timeout, env=full)
    except FileNotFoundError:
        pytest.fail("unshare (util-linux) is needed to run the binaries in private namespaces")


DOWNWARD = {
    "spec.nodeName": "node-1",
    "metadata.name": "ztunnel-x7k2p",
    "metadata.namespace": "istio-system",
    "status.podIP": "10.244.1.7",
    "spec.serviceAccountName": "ztunnel",
}


def container_env(c: dict) -> dict[str, str]:
    env = {}
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = str(e["value"])
        else:
            env[e["name"]] = DOWNWARD[e["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


@pytest.mark.parametrize("values", [None, "production"])
def test_ztunnel_reads_every_variable_and_serves_the_probed_ports(values):
    from conftest import CHARTS_DIR

    r = render("ztunnel", str(CHARTS_DIR / "ztunnel/examples" / f"{values}.yaml") if values else None)
    ds = r.one("DaemonSet", "ztunnel")
    c = container(ds, "istio-proxy")
    env = container_env(c)
    probe = c["readinessProbe"]["httpGet"]
    ann = ds["spec"]["template"]["metadata"]["annotations"]
    admin = env["ADMIN_ADDR"]
    # ztunnel as the pod runs it: the chart's variables and mounts, its root file system
    # read-only except the mounts. It cannot reach istiod-lite, so it waits for configuration
    # (not ready) while it serves metrics, readiness and admin.
    script = f"""
        mount -t tmpfs tmpfs /run
        mkdir -p /run/ztunnel /run/secrets/istio /run/secrets/tokens
        echo token > /run/secrets/tokens/istio-token
        ip link set lo up
        {shlex.quote(str(binary('ztunnel')))} 2>/tmp/ztunnel.log.$$ &
        pid=$!
        for i in $(seq 1 100); do
            curl -s -o /dev/null http://{admin}/config_dump && break
            kill -0 $pid 2>/dev/null || {{ cat /tmp/ztunnel.log.$$ >&2; exit 3; }}
            sleep 0.1
        done
        echo "=== config_dump"; curl -s http://{admin}/config_dump; echo
        echo "=== ready"; curl -s -w '%{{http_code}}\\n' http://127.0.0.1:{probe['port']}{probe['path']}
        echo "=== metrics"; curl -s -o /dev/null -w '%{{http_code}}\\n' \
            http://127.0.0.1:{ann['prometheus.io/port']}{ann['prometheus.io/path']}
        kill -TERM $pid; wait $pid || true
        rm -f /tmp/ztunnel.log.$$
    """
    done = isolated(script, env, timeout=120)
    assert done.returncode == 0, f"ztunnel with the chart's environment: {done.stderr}"
    sections = dict(re.findall(r"=== (\w+)\n(.*?)(?=\n=== |\Z)", done.stdout, re.S))
    dump = json.loads(sections["config_dump"])
    effective = find_effective(dump)
    for name, value in env.items():
        assert name in effective, f"ztunnel does not read {name} (set by the chart)"
        if name == "AUTH_TOKEN":
            continue  # a secret: shown masked
        read = effective[name]
        if name in ("SECRET_TTL", "DRAIN_DEADLINE", "CONNECT_TIMEOUT"):
            read, value = seconds(read), seconds(value)
        assert read == value, f"{name}: ztunnel read {read!r}, the chart set {value!r}"
    # The probe hits the real readiness endpoint: not ready yet, and saying why.
    assert sections["ready"].strip().endswith("500"), sections["ready"]
    assert "not ready" in sections["ready"]
    assert sections["metrics"].strip() == "200"
    # Ports the chart declares are the ones ztunnel listens on.
    ports = {p["containerPort"] for p in c["ports"]}
    assert ports == {int(env["STATS_ADDR"].rsplit(":", 1)[1]), int(env["READINESS_ADDR"].rsplit(":", 1)[1])}
    assert probe["port"] == int(env["READINESS_ADDR"].rsplit(":", 1)[1])
    assert int(ann["prometheus.io/port"]) == int(env["STATS_ADDR"].rsplit(":", 1)[1])


def seconds(text: str) -> float:
    """A duration as ztunnel takes it (`24h`, `1h30m`, `25`) or shows it (`1day`, `1h 30m`)."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "day": 86400,
             "days": 86400, "d": 86400}
    if re.fullmatch(r"\d+", text):
        return float(text)
    parts = re.findall(r"(\d+)\s*([a-z]+)", text)
    assert parts and "".join(n + u for n, u in parts) == re.sub(r"\s", "", text), text
    return sum(int(n) * units[u] for n, u in parts)


def find_effective(dump: dict) -> dict[str, str]:
    """The effective settings in ztunnel's /config_dump (variable -> value as read)."""
    for key in ("config", "settings", "effective"):
        if key in dump:
            value = dump[key]
            if isinstance(value, list):
                return {k: v for k, v in value}
            return value
    raise AssertionError(f"no effective settings in config_dump: {list(dump)}")


def test_ztunnel_drain_fits_in_the_grace_period_and_mounts_what_it_reads():
    for values in [None, "production"]:
        from conftest import CHARTS_DIR

        r = render("ztunnel", str(CHARTS_DIR / "ztunnel/examples" / f"{values}.yaml") if values else None)
        ds = r.one("DaemonSet", "ztunnel")
        spec = pod_spec(ds)
        c = container(ds, "istio-proxy")
        env = container_env(c)
        drain = int(env["DRAIN_DEADLINE"].rstrip("s"))
        assert 0 < drain < spec["terminationGracePeriodSeconds"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        for var in ("XDS_ROOT_CA", "CA_ROOT_CA", "AUTH_TOKEN", "INPOD_UDS"):
            assert os.path.dirname(env[var]) in mounts, f"{var}={env[var]} is not mounted"
        token = volumes[mounts["/var/run/secrets/tokens"]]["projected"]["sources"][0]
        assert token["serviceAccountToken"]["audience"] == "istio-ca"
        assert token["serviceAccountToken"]["path"] == os.path.basename(env["AUTH_TOKEN"])
        root = volumes[mounts["/var/run/secrets/istio"]]["configMap"]
        assert root["name"] == "istio-ca-root-cert"
        assert os.path.basename(env["XDS_ROOT_CA"]) == "root-cert.pem"
        sc = c["securityContext"]
        assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN"]}
        assert sc["readOnlyRootFilesystem"] is True and sc.get("privileged") is False
        # The name istiod-lite lets impersonate pods on its node.
        assert spec["serviceAccountName"] == "ztunnel"
        assert ds["spec"]["template"]["metadata"]["labels"]["app"] == "ztunnel"
