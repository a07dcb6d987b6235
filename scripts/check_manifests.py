#!/usr/bin/env python3
"""Validates the Kubernetes manifests and the Helm chart offline.

1. Renders deploy/helm/blocksel for each values-<backend>.yaml with a small
   renderer of the template subset the chart uses (value substitution and
   if / else if / else / end on their own lines), and checks the result is
   the committed copy in deploy/helm/rendered/ (--write refreshes it).
   Helm is not packaged on the build machines.
2. Parses every manifest in deploy/k8s and deploy/helm/rendered as YAML and
   checks the fields that matter: the blocksel sidecar is a native sidecar
   with gRPC startup, liveness and readiness probes on the health service,
   its GPU resource matches its --backend, the termination grace period
   covers the drain it is configured with, its memory limit covers what
   the server may hold in host memory (gRPC's buffers, plus the key cache
   on the CPU backend, plus a margin), it runs as non-root, the pod is
   annotated for scraping on the metrics port, and each ServiceMonitor
   selects a Service that has its port.
"""
import argparse
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy/helm/blocksel"
RENDERED = ROOT / "deploy/helm/rendered"
RELEASE = "blocksel"
READINESS_SERVICE = "blocksel.v1.BlockSelector"
GPU_RESOURCE = {"cuda": "nvidia.com/gpu", "hip": "amd.com/gpu", "cpu": None}
DEFAULT_DRAIN = {"drain_propagation_seconds": 5, "shutdown_grace_seconds": 30}
SNAPSHOT_MARGIN_SECONDS = 10
# The server's defaults, and what it needs beyond its caches and buffers
# (code, threads, staging, a GPU runtime).
DEFAULT_GRPC_MEMORY_MIB = 1024
DEFAULT_CACHE_MIB = 1024
MEMORY_MARGIN_MIB = 1024
UNITS_MIB = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 * 1024}


def mebibytes(quantity):
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)", str(quantity))
    if not match:
        raise ValueError(f"memory quantity '{quantity}' is not in Ki, Mi, Gi or Ti")
    return int(match.group(1)) * UNITS_MIB[match.group(2)]


def merge(base, override):
    result = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result


def lookup(expression, values):
    expression = expression.strip()
    if expression == ".Release.Name":
        return RELEASE
    if not expression.startswith(".Values."):
        raise ValueError(f"unsupported template expression '{expression}'")
    node = values
    for part in expression[len(".Values."):].split("."):
        node = node[part]
    return node


def condition(text, values):
    match = re.fullmatch(r'eq (\S+) "([^"]*)"', text.strip())
    if match:
        return str(lookup(match.group(1), values)) == match.group(2)
    return bool(lookup(text, values))


CONTROL = re.compile(r"\s*\{\{-?\s*(if|else if|else|end)\b(.*?)-?\}\}\s*")


def render(template, values):
    out = []
    # Each frame: [branch taken already, this branch active].
    stack = []
    for line in template.splitlines(keepends=True):
        control = CONTROL.fullmatch(line)
        if control:
            word, rest = control.group(1), control.group(2)
            if word == "if":
                active = all(f[1] for f in stack) and condition(rest, values)
                stack.append([active, active])
            elif word == "else if":
                taken = stack[-1][0]
                active = not taken and condition(rest, values)
                stack[-1] = [taken or active, active]
            elif word == "else":
                stack[-1] = [True, not stack[-1][0]]
            else:
                stack.pop()
            continue
        if not all(frame[1] for frame in stack):
            continue
        out.append(re.sub(r"\{\{\s*(.*?)\s*\}\}", lambda m: str(lookup(m.group(1), values)), line))
    if stack:
        raise ValueError("unclosed if")
    return "".join(out)


def render_chart(backend):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    values = merge(values, yaml.safe_load((CHART / f"values-{backend}.yaml").read_text()))
    parts = []
    for template in sorted((CHART / "templates").glob("*.yaml")):
        parts.append(f"---\n# Source: blocksel/templates/{template.name}\n")
        parts.append(render(template.read_text(), values))
    return "".join(parts)


def flag(args, name):
    for arg in args:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def check_deployment(source, deployment, problems):
    spec = deployment["spec"]["template"]
    pod = spec["spec"]
    where = f"{source}: Deployment {deployment['metadata']['name']}"
    sidecars = [c for c in pod.get("initContainers", []) if c.get("name") == "blocksel"]
    if len(sidecars) != 1:
        problems.append(f"{where}: no blocksel init container")
        return
    sidecar = sidecars[0]
    if sidecar.get("restartPolicy") != "Always":
        problems.append(f"{where}: blocksel is not a native sidecar (restartPolicy: Always)")
    args = sidecar.get("args", [])
    backend = flag(args, "backend") or "auto"
    ports = {p["name"]: p["containerPort"] for p in sidecar.get("ports", [])}
    grpc_port, metrics_port = ports.get("grpc"), ports.get("metrics")
    if grpc_port is None or metrics_port is None:
        problems.append(f"{where}: blocksel needs ports named grpc and metrics")
    listen = flag(args, "listen")
    if listen is not None and not listen.endswith(f":{grpc_port}"):
        problems.append(f"{where}: --listen {listen} is not the grpc port {grpc_port}")
    metrics = flag(args, "metrics_address")
    if metrics is not None and not metrics.endswith(f":{metrics_port}"):
        problems.append(f"{where}: --metrics_address {metrics} is not the metrics port")
    for probe_name, service in (("startupProbe", READINESS_SERVICE),
                                ("livenessProbe", ""),
                                ("readinessProbe", READINESS_SERVICE)):
        probe = sidecar.get(probe_name, {}).get("grpc")
        if probe is None:
            problems.append(f"{where}: {probe_name} is not a gRPC probe")
            continue
        if probe.get("port") != grpc_port:
            problems.append(f"{where}: {probe_name} checks port {probe.get('port')}")
        if probe.get("service", "") != service:
            problems.append(f"{where}: {probe_name} checks service '{probe.get('service', '')}', "
                            f"expected '{service}'")
    limits = sidecar.get("resources", {}).get("limits", {})
    wanted = GPU_RESOURCE.get(backend)
    gpu_limits = [name for name in limits if name.endswith("/gpu")]
    # A GPU may also come from a resource claim of the pod (DRA).
    pod_claims = {c["name"] for c in pod.get("resourceClaims", [])}
    claims = {c["name"] for c in sidecar.get("resources", {}).get("claims", [])}
    if claims - pod_claims:
        problems.append(f"{where}: blocksel names claims {sorted(claims - pod_claims)} the pod lacks")
    if wanted is None and (gpu_limits or claims):
        problems.append(f"{where}: --backend={backend} but GPU limits {gpu_limits} or claims")
    if wanted is not None and not claims and gpu_limits != [wanted]:
        problems.append(f"{where}: --backend={backend} needs the limit {wanted}, has {gpu_limits}")
    if claims:
        check_colocated(where, pod, sidecar, claims, args, problems)
    memory_limit = limits.get("memory")
    if memory_limit is None:
        problems.append(f"{where}: blocksel has no memory limit")
    else:
        needed = int(flag(args, "grpc_memory_mib") or DEFAULT_GRPC_MEMORY_MIB) + MEMORY_MARGIN_MIB
        if backend == "cpu":
            needed += int(flag(args, "cache_mib") or DEFAULT_CACHE_MIB)
        if mebibytes(memory_limit) < needed:
            problems.append(f"{where}: memory limit {memory_limit} < {needed} MiB that "
                            f"--backend={backend} may use")
    drain = sum(int(flag(args, name) or default) for name, default in DEFAULT_DRAIN.items())
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace < drain + SNAPSHOT_MARGIN_SECONDS:
        problems.append(f"{where}: terminationGracePeriodSeconds {grace} < drain {drain} + "
                        f"{SNAPSHOT_MARGIN_SECONDS} s for the snapshot")
    if not pod.get("securityContext", {}).get("runAsNonRoot"):
        problems.append(f"{where}: the pod does not require a non-root user")
    annotations = spec.get("metadata", {}).get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true" or \
            annotations.get("prometheus.io/port") != str(metrics_port):
        problems.append(f"{where}: scrape annotations do not name the metrics port {metrics_port}")


def check_colocated(where, pod, sidecar, claims, args, problems):
    """A container sharing blocksel's GPU claim is a co-located worker: both
    must mount one memory-backed volume at /dev/shm, and attaches must be
    allowed."""
    def shm_volume(container):
        mounts = [m["name"] for m in container.get("volumeMounts", [])
                  if m.get("mountPath") == "/dev/shm"]
        return mounts[0] if mounts else None

    workers = [c for c in pod.get("containers", [])
               if claims & {x["name"] for x in c.get("resources", {}).get("claims", [])}]
    if not workers:
        return
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for container in [sidecar] + workers:
        name = shm_volume(container)
        if name is None or name != shm_volume(sidecar):
            problems.append(f"{where}: {container['name']} does not mount blocksel's /dev/shm")
        elif volumes.get(name, {}).get("emptyDir", {}).get("medium") != "Memory":
            problems.append(f"{where}: /dev/shm volume {name} is not memory-backed")
    if int(flag(args, "colocated_max_attachments") or 16) < 1:
        problems.append(f"{where}: a co-located worker but --colocated_max_attachments=0")


def check_documents(source, documents, problems):
    services = [d for d in documents if d.get("kind") == "Service"]
    for document in documents:
        kind = document.get("kind")
        if kind == "Deployment":
            check_deployment(source, document, problems)
        elif kind == "ServiceMonitor":
            selector = document["spec"]["selector"]["matchLabels"]
            ports = {e["port"] for e in document["spec"]["endpoints"]}
            matched = [s for s in services
                       if selector.items() <= s["metadata"].get("labels", {}).items()]
            if not matched:
                problems.append(f"{source}: ServiceMonitor selects no Service")
            for service in matched:
                names = {p["name"] for p in service["spec"]["ports"]}
                if not ports <= names:
                    problems.append(f"{source}: ServiceMonitor ports {ports} not in {names}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="refresh deploy/helm/rendered")
    arguments = parser.parse_args()
    problems = []
    for values in sorted(CHART.glob("values-*.yaml")):
        backend = values.stem[len("values-"):]
        rendered = render_chart(backend)
        copy = RENDERED / f"{backend}.yaml"
        if arguments.write:
            copy.write_text(rendered)
        elif not copy.exists() or copy.read_text() != rendered:
            problems.append(f"{copy.relative_to(ROOT)} is not what the chart renders for "
                            f"{values.name}; run scripts/check_manifests.py --write")
    manifests = sorted((ROOT / "deploy/k8s").glob("*.yaml")) + sorted(RENDERED.glob("*.yaml"))
    for manifest in manifests:
        documents = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
        check_documents(manifest.relative_to(ROOT), documents, problems)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"check_manifests: {len(manifests)} files, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
