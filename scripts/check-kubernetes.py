#!/usr/bin/env python3
"""Renders every overlay under deploy/kubernetes/overlays with
`kubectl kustomize`, validates the output against the Kubernetes schemas
(the `kubernetes-validate` package, strict), and checks that the manifests
agree with the binaries: every DUO_* variable is a flag of the service the
container runs (from `duo <service> --help`), ports, probes, Service
names and the orchestrator's target and discovery names line up.

    python scripts/check-kubernetes.py --duo target/debug/duo [--kubectl kubectl]

Exits non-zero with one line per problem. Run by tests/kubernetes.rs.
"""
import argparse
import pathlib
import re
import subprocess
import sys

import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
K8S_VERSION = "1.37.0"
SERVICES = {"target-service", "draft-service", "orchestrator"}


def grpc_services():
    """The gRPC service names the binaries register, from the proto file."""
    proto = (ROOT / "proto/duo/v1/duo.proto").read_text()
    package = re.search(r"^package\s+([\w.]+);", proto, re.M).group(1)
    return {f"{package}.{name}" for name in re.findall(r"^service\s+(\w+)", proto, re.M)}


# Which gRPC service each binary's readiness must ask about.
READY_SERVICE = {
    "target-service": "duo.v1.Target",
    "draft-service": "duo.v1.Draft",
    "orchestrator": "duo.v1.Generation",
}


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def check_overlay(name, docs, help_of, problems):
    def bad(msg):
        problems.append(f"{name}: {msg}")

    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    services = {d["metadata"]["name"]: d for d in by_kind.get("Service", [])}
    known = grpc_services()
    def serving(svc):
        """The (deployment, container) a Service selects."""
        sel = svc["spec"].get("selector", {})
        for dep_name, dep in deployments.items():
            labels = dep["spec"]["template"]["metadata"].get("labels", {})
            if sel and all(labels.get(k) == v for k, v in sel.items()):
                return dep_name, dep["spec"]["template"]["spec"]["containers"][0]
        return None, None

    def check_address(where, addr, want_service, headless):
        m = re.fullmatch(r"(?:https?://)?([\w.-]+):(\d+)", addr)
        if not m:
            bad(f"{where}: address {addr!r} is not host:port")
            return
        host, port = m.group(1), int(m.group(2))
        svc = services.get(host.split(".")[0])
        if svc is None:
            bad(f"{where}: {addr} names no Service in the manifests")
            return
        if headless != (svc["spec"].get("clusterIP") == "None"):
            bad(f"{where}: Service {host} must {'' if headless else 'not '}be headless")
        if port not in [p["port"] for p in svc["spec"]["ports"]]:
            bad(f"{where}: Service {host} has no port {port}")
        _, c = serving(svc)
        if c is None or not c.get("args") or c["args"][0] != want_service:
            bad(f"{where}: Service {host} does not select a {want_service}")

    for dep_name, dep in deployments.items():
        pod = dep["spec"]["template"]
        labels = pod["metadata"].get("labels", {})
        sel = dep["spec"]["selector"]["matchLabels"]
        if any(labels.get(k) != v for k, v in sel.items()):
            bad(f"deployment {dep_name}: selector {sel} does not match its pod labels")
        for c in pod["spec"]["containers"]:
            where = f"deployment {dep_name} container {c['name']}"
            image = c.get("image", "")
            if ":" not in image:
                bad(f"{where}: image {image!r} is a placeholder no images: entry mapped")
            args = c.get("args", [])
            service = args[0] if args else None
            if service not in SERVICES:
                bad(f"{where}: args {args} do not start with a duo service")
                continue
            text = help_of(service)
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            for var in env:
                if var.startswith("DUO_") and f"[env: {var}=" not in text:
                    bad(f"{where}: {var} is not a flag of `duo {service}`")
            for flag in args[1:]:
                if flag.startswith("--") and flag.split("=")[0] not in text:
                    bad(f"{where}: {flag} is not a flag of `duo {service}`")
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for var, port_name in [("DUO_LISTEN", "grpc"), ("DUO_METRICS_LISTEN", "metrics"), ("DUO_HTTP_LISTEN", "http")]:
                if var in env and ports.get(port_name) != port_of(env[var]):
                    bad(f"{where}: {var}={env[var]} but port {port_name} is {ports.get(port_name)}")
            if "DUO_LISTEN" not in env:
                bad(f"{where}: no DUO_LISTEN")
            ann = pod["metadata"].get("annotations", {})
            if ann.get("prometheus.io/scrape") == "true" and int(ann.get("prometheus.io/port", 0)) != ports.get("metrics"):
                bad(f"{where}: prometheus.io/port {ann.get('prometheus.io/port')} is not the metrics port")
            for probe_name in ["startupProbe", "readinessProbe", "livenessProbe"]:
                probe = c.get(probe_name)
                if not probe:
                    if probe_name != "startupProbe":
                        bad(f"{where}: no {probe_name}")
                    continue
                if "grpc" in probe:
                    g = probe["grpc"]
                    if g["port"] != ports.get("grpc"):
                        bad(f"{where}: {probe_name} asks port {g['port']}, gRPC is on {ports.get('grpc')}")
                    svc = g.get("service", "")
                    if svc and svc not in known:
                        bad(f"{where}: {probe_name} asks for {svc}, not a service of duo.proto {sorted(known)}")
                    if probe_name == "readinessProbe" and svc != READY_SERVICE[service]:
                        bad(f"{where}: readiness asks for {svc!r}, `duo {service}` reports {READY_SERVICE[service]}")
                elif "tcpSocket" in probe:
                    p = probe["tcpSocket"]["port"]
                    if p not in ports and p not in ports.values():
                        bad(f"{where}: {probe_name} port {p} is not a container port")
            if service == "draft-service":
                if "cpu" not in c.get("resources", {}).get("requests", {}):
                    bad(f"{where}: no CPU request, which the autoscaler needs")
            if service == "orchestrator":
                check_address(where, env.get("DUO_TARGET", ""), "target-service", False)
                for dns in (env.get("DUO_DRAFT_DNS") or "").split(","):
                    check_address(where, dns, "draft-service", True)

    for svc_name, svc in services.items():
        dep_name, c = serving(svc)
        if c is None:
            bad(f"Service {svc_name} selects no Deployment")
            continue
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            if (tp not in ports) if isinstance(tp, str) else (tp not in ports.values()):
                bad(f"Service {svc_name}: targetPort {tp} is not a port of {dep_name}")
            elif isinstance(tp, str) and ports[tp] != p["port"]:
                bad(f"Service {svc_name}: port {p['port']} forwards to {tp}={ports[tp]}")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]["name"]
        if ref not in deployments:
            bad(f"HPA {hpa['metadata']['name']} scales {ref}, which is not a Deployment here")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        sel = pdb["spec"]["selector"]["matchLabels"]
        if not any(all(d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items()) for d in deployments.values()):
            bad(f"PDB {pdb['metadata']['name']} selects no pods")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duo", required=True, help="the duo binary")
    ap.add_argument("--kubectl", default="kubectl")
    a = ap.parse_args()
    helps = {}

    def help_of(service):
        if service not in helps:
            helps[service] = subprocess.run([a.duo, service, "--help"], check=True, capture_output=True, text=True).stdout
        return helps[service]

    problems = []
    overlays = sorted(p for p in (ROOT / "deploy/kubernetes/overlays").iterdir() if p.is_dir())
    if not overlays:
        problems.append("no overlays found")
    for overlay in overlays:
        name = overlay.name
        r = subprocess.run([a.kubectl, "kustomize", str(overlay)], capture_output=True, text=True)
        if r.returncode != 0:
            problems.append(f"{name}: kubectl kustomize failed: {r.stderr.strip()}")
            continue
        docs = [d for d in yaml.safe_load_all(r.stdout) if d]
        for d in docs:
            try:
                kubernetes_validate.validate(d, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{name}: {d['kind']}/{d['metadata']['name']} fails the {K8S_VERSION} schema: {e.message}")
            except Exception as e:  # noqa: BLE001 (an unknown kind, a schema error)
                problems.append(f"{name}: {d['kind']}/{d['metadata']['name']}: {e}")
        check_overlay(name, docs, help_of, problems)
        print(f"{name}: {len(docs)} objects rendered and checked")
    for p in problems:
        print(p, file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
