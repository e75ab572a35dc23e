"""What Kennel's deployment tests share: the flags and default ports the
binaries really have (read from their --helpfull at test time), the rendered
Kubernetes overlays, and the arguments a manifest or compose file passes.
"""

import functools
import os
import re
import shutil
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))

import kennel_testlib  # noqa: E402
from kennel_testlib import SOURCE_DIR, SKIP  # noqa: E402,F401

import yaml  # noqa: E402

K8S_DIR = os.path.join(SOURCE_DIR, "k8s")
DEPLOY_DIR = os.path.join(SOURCE_DIR, "deploy")
MONITORING_DIR = os.path.join(K8S_DIR, "components", "monitoring")
OVERLAYS = ("dev", "prod")

# The Kennel server binaries, by the name a container or compose service uses.
SERVICES = ("registry", "trainer", "inference")

# The flags contracts.md promises, per binary (the shared ones included).
# The manifests pass a subset; a flag missing from a binary fails the tests
# that use it.
SHARED_FLAGS = {"listen", "metrics_listen", "token_file", "tls_cert", "tls_key",
                "threads", "max_message_mb", "drain_seconds"}
CONTRACT_FLAGS = {
    "registry": SHARED_FLAGS | {"storage", "s3_endpoint", "s3_region", "s3_path_style"},
    "trainer": SHARED_FLAGS | {"registry", "data_root", "cache_dir", "jobs_dir", "device",
                               "max_concurrent_jobs"},
    "inference": SHARED_FLAGS | {"registry", "model", "model_path", "labels", "precision",
                                 "max_batch_size", "max_queue_delay", "max_queue",
                                 "max_image_bytes", "max_pixels", "cache_dir"},
}

_FLAG_LINE = re.compile(r"^    --([A-Za-z0-9_]+) \(", re.M)


@functools.lru_cache(maxsize=None)
def helpfull(service):
    """The --helpfull text of kennel-<service>."""
    result = subprocess.run([kennel_testlib.binary(service), "--helpfull"],
                            capture_output=True, text=True, timeout=30)
    text = result.stdout + result.stderr
    if "--listen" not in text:
        raise AssertionError(f"kennel-{service} --helpfull lists no flags:\n{text}")
    return text


@functools.lru_cache(maxsize=None)
def binary_flags(service):
    """Names (underscore spelling) of every flag kennel-<service> accepts."""
    return frozenset(_FLAG_LINE.findall(helpfull(service)))


@functools.lru_cache(maxsize=None)
def default_ports():
    """{service: (grpc_port, metrics_port)} from the --listen and
    --metrics-listen help texts of the binaries."""
    text = " ".join(helpfull("registry").split())
    ports = {}
    for flag, index in (("listen", 0), ("metrics_listen", 1)):
        m = re.search(r"--" + flag + r" \((.*?)\); default:", text)
        if not m:
            raise AssertionError(f"no help text for --{flag}")
        for service, port in re.findall(r"(registry|trainer|inference) [0-9.]+:(\d+)", m.group(1)):
            ports.setdefault(service, [None, None])[index] = int(port)
    for service in SERVICES:
        if service not in ports or None in ports[service]:
            raise AssertionError(f"--listen/--metrics-listen help names no default port for "
                                 f"{service}: {ports}")
    return {s: tuple(p) for s, p in ports.items()}


def normalize_flag(name):
    return name.replace("-", "_")


def parse_flags(args):
    """['--a-b=1', '--c=x'] -> {'a_b': '1', 'c': 'x'}. Every argument must be
    a --name=value flag (no positional arguments, no separate values)."""
    flags = {}
    for arg in args:
        m = re.fullmatch(r"--([A-Za-z0-9_-]+)=(.*)", str(arg), re.S)
        if not m:
            raise AssertionError(f"argument {arg!r} is not of the form --flag=value")
        name = normalize_flag(m.group(1))
        if name in flags:
            raise AssertionError(f"flag --{name} given twice")
        flags[name] = m.group(2)
    return flags


def port_of(address):
    """'0.0.0.0:50051' or ':50051' -> 50051."""
    m = re.fullmatch(r"(?:[0-9.]*|\[[0-9a-f:]*\]):(\d+)", address)
    if not m:
        raise AssertionError(f"{address!r} is not HOST:PORT")
    return int(m.group(1))


KUBECTL_MISSING = ("kubectl is not installed; the Kubernetes manifest checks need "
                   "`kubectl kustomize` (kubectl is not in Debian 12; install it from the "
                   "Kubernetes apt repository)")


def require_kubectl():
    """Exits 77 (ctest: skipped) without kubectl."""
    if not have_tool("kubectl"):
        print(f"SKIP: {KUBECTL_MISSING}", file=sys.stderr)
        sys.exit(SKIP)


def skip_without_kubectl(test):
    """Skips one unittest test or class without kubectl; the others run."""
    if not have_tool("kubectl"):
        raise unittest.SkipTest(KUBECTL_MISSING)


@functools.lru_cache(maxsize=None)
def render(path):
    """Objects of `kubectl kustomize <path>` (path relative to k8s/)."""
    result = subprocess.run(["kubectl", "kustomize", os.path.join(K8S_DIR, path)],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize k8s/{path} failed:\n{result.stderr}")
    return tuple(o for o in yaml.safe_load_all(result.stdout) if o)


def pod_templates(objects):
    """(workload object, pod spec, pod labels) of every Deployment, Job,
    StatefulSet and DaemonSet."""
    out = []
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            template = o["spec"]["template"]
            out.append((o, template["spec"], template["metadata"].get("labels", {})))
    return out


def kennel_container(objects, service):
    """(deployment, pod spec, container) of the Kennel <service>."""
    for o, spec, _ in pod_templates(objects):
        if o["kind"] == "Deployment" and o["metadata"]["name"] == f"kennel-{service}":
            containers = spec["containers"]
            assert len(containers) == 1, f"kennel-{service} has {len(containers)} containers"
            return o, spec, containers[0]
    raise AssertionError(f"no Deployment kennel-{service}")


def resolve_env(objects, container, value):
    """Expands $(VAR) in a container argument the way the kubelet does, from
    literal env values and ConfigMap keys in the rendered objects."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        ref = e.get("valueFrom", {}).get("configMapKeyRef")
        if ref:
            env[e["name"]] = config_map(objects, ref["name"])["data"][ref["key"]]

    def sub(m):
        if m.group(1) not in env:
            raise AssertionError(f"$({m.group(1)}) in {value!r} is not defined by a literal env "
                                 f"value or ConfigMap key of container {container['name']}")
        return env[m.group(1)]
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


def config_map(objects, name):
    for o in objects:
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name:
            return o
    raise AssertionError(f"no ConfigMap {name}")


def matches(selector, labels):
    """A LabelSelector (matchLabels and matchExpressions) against labels."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        op, key, values = e["operator"], e["key"], e.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def have_tool(name):
    return shutil.which(name) is not None


# ---------------------------------------------------------------- PromQL

_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                 "and", "or", "unless", "offset", "inf", "nan", "atan2", "start", "end"}
# Grafana's variables, replaced by values Prometheus accepts.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h",
                     "training_job": "no-such-job"}


def grafana_expand(expr, variables=None):
    """Replaces $var and ${var} with `variables` (GRAFANA_VARIABLES by
    default); fails on others."""
    variables = variables or GRAFANA_VARIABLES

    def sub(m):
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise AssertionError(f"unknown dashboard variable ${name} in {expr!r}")
        return variables[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, expr)


def promql_metric_names(expr):
    """Metric names a PromQL expression selects (bare identifiers that are
    not functions, aggregations, keywords, label names or durations)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)          # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)         # ranges and subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)", s):
        if s[m.end():].lstrip().startswith("("):
            continue  # a function or an aggregation
        if m.group(1).lower() in _PROMQL_WORDS:
            continue
        names.add(m.group(1))
    return names


def dashboard_queries(dashboard):
    """(where, expression) of every panel target and query variable."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"panel {p.get('id')} {p.get('title')!r} {t.get('refId')}",
                                t["expr"]))
            walk(p.get("panels", []))
    walk(dashboard.get("panels", []))
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        query = v["query"]["query"] if isinstance(v.get("query"), dict) else v.get("query")
        m = label_values(query)
        if m:  # Grafana's own function: the series selector is the first part
            query = m[0]
        out.append((f"variable {v['name']}", query))
    return out


def label_values(query):
    """label_values(SELECTOR, LABEL) -> (SELECTOR, LABEL), else None."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", query)
    return (m.group(1), m.group(2)) if m else None
