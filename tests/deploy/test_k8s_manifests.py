"""Renders every kustomize overlay with `kubectl kustomize` and checks what
the manifests promise: gRPC probes on the right ports, resources and a
locked-down securityContext on every container, the GPU on the trainer only,
HPA and PDB aimed at the inference Deployment, Services that select real
pods, network paths, and flags and ports that the binaries really have.
"""

import ipaddress
import re
import unittest

import yaml

import deploy_testlib as dt

# Secrets the prod overlay expects to exist already (its header says so).
PROD_EXTERNAL_SECRETS = {"kennel-token", "kennel-s3-credentials"}
HEALTH_NAMES = {"registry": "kennel.v1.ModelRegistry", "trainer": "kennel.v1.Trainer",
                "inference": "kennel.v1.Classifier"}
# A public address S3 could have; a pod's traffic to it leaves the cluster.
S3_ADDRESS = "52.95.150.10"


def kennel_flags(objects, service):
    """{flag: value with $(VAR) expanded} of the Kennel <service> container."""
    _, _, container = dt.kennel_container(objects, service)
    assert "command" not in container, "the image's entrypoint runs the binary; pass args only"
    raw = dt.parse_flags(container.get("args", []))
    return {k: dt.resolve_env(objects, container, v) for k, v in raw.items()}


def named_ports(container):
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def prestop_sleep(container):
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    if not command:
        return None
    assert command[0] == "sleep" and len(command) == 2, f"preStop {command} is not `sleep N`"
    return float(command[1])


def cpu_cores(quantity):
    quantity = str(quantity)
    if quantity.endswith("m"):
        return int(quantity[:-1]) / 1000
    return float(quantity)


class NetworkModel:
    """Enough of NetworkPolicy semantics to answer "may A open a TCP
    connection to port P of B": a connection needs the egress of A's policies
    and the ingress of B's policies to allow it (no policy of a direction
    selects the pod: that direction is open)."""

    def __init__(self, objects, namespace="kennel"):
        self.policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
        self.namespace = namespace
        self.pods = {}  # name -> (labels, {port name: number})
        for o, spec, labels in dt.pod_templates(objects):
            ports = {}
            for c in spec["containers"]:
                ports.update(named_ports(c))
            self.pods[o["metadata"]["name"]] = (labels, ports)

    # An endpoint: ("pod", labels, ports, namespace labels) or ("ip", address).
    def pod(self, name):
        labels, ports = self.pods[name]
        return ("pod", labels, ports, {"kubernetes.io/metadata.name": self.namespace})

    @staticmethod
    def foreign_pod(labels, namespace, ports=None):
        return ("pod", labels, ports or {}, {"kubernetes.io/metadata.name": namespace})

    @staticmethod
    def ip(address):
        return ("ip", address)

    def _selecting(self, endpoint, direction):
        if endpoint[0] != "pod" or endpoint[3]["kubernetes.io/metadata.name"] != self.namespace:
            return None  # not governed by these policies
        return [p for p in self.policies
                if direction in p["spec"].get("policyTypes", ["Ingress"])
                and dt.matches(p["spec"]["podSelector"], endpoint[1])]

    def _peer_matches(self, peer, endpoint):
        if "ipBlock" in peer:
            if endpoint[0] != "ip":
                return False
            address = ipaddress.ip_address(endpoint[1])
            if address not in ipaddress.ip_network(peer["ipBlock"]["cidr"]):
                return False
            return not any(address in ipaddress.ip_network(e)
                           for e in peer["ipBlock"].get("except", []))
        if endpoint[0] != "pod":
            return False
        if "namespaceSelector" in peer:
            if not dt.matches(peer["namespaceSelector"], endpoint[3]):
                return False
        elif endpoint[3]["kubernetes.io/metadata.name"] != self.namespace:
            return False
        return dt.matches(peer.get("podSelector", {}), endpoint[1])

    @staticmethod
    def _port_matches(rule_ports, port, destination):
        if not rule_ports:
            return True
        for rp in rule_ports:
            if rp.get("protocol", "TCP") != "TCP":
                continue
            want = rp.get("port")
            if want is None:
                return True
            if isinstance(want, str):
                want = destination[2].get(want) if destination[0] == "pod" else None
            if want == port:
                return True
        return False

    def allows(self, source, destination, port):
        egress = self._selecting(source, "Egress")
        if egress:
            if not any(self._port_matches(rule.get("ports"), port, destination)
                       and (not rule.get("to")
                            or any(self._peer_matches(peer, destination) for peer in rule["to"]))
                       for p in egress for rule in p["spec"].get("egress", []) or []):
                return False
        ingress = self._selecting(destination, "Ingress")
        if ingress:
            if not any(self._port_matches(rule.get("ports"), port, destination)
                       and (not rule.get("from")
                            or any(self._peer_matches(peer, source) for peer in rule["from"]))
                       for p in ingress for rule in p["spec"].get("ingress", []) or []):
                return False
        return True


class OverlayChecks:
    """Checks every overlay must pass; subclasses name the overlay."""

    overlay = None

    @classmethod
    def setUpClass(cls):
        dt.require_kubectl()
        cls.objects = dt.render(f"overlays/{cls.overlay}")

    def of_kind(self, kind):
        return [o for o in self.objects if o["kind"] == kind]

    def test_everything_in_one_namespace(self):
        for o in self.objects:
            if o["kind"] == "Namespace":
                self.assertEqual(o["metadata"]["name"], "kennel")
            else:
                self.assertEqual(o["metadata"].get("namespace"), "kennel",
                                 f"{o['kind']}/{o['metadata']['name']}")

    def test_flags_exist_in_binaries(self):
        problems = []
        for service in dt.SERVICES:
            flags = kennel_flags(self.objects, service)
            accepted = dt.binary_flags(service)
            unknown = sorted(set(flags) - accepted)
            if unknown:
                problems.append(f"kennel-{service} does not accept "
                                f"{['--' + f for f in unknown]} (its --helpfull lists "
                                f"{sorted(accepted)})")
        self.assertFalse(problems, "\n".join(problems))

    def test_ports_agree_with_binaries(self):
        defaults = dt.default_ports()
        for service in dt.SERVICES:
            deployment, spec, container = dt.kennel_container(self.objects, service)
            flags = kennel_flags(self.objects, service)
            grpc_port, metrics_port = defaults[service]
            self.assertEqual(dt.port_of(flags["listen"]), grpc_port, service)
            self.assertEqual(dt.port_of(flags["metrics_listen"]), metrics_port, service)
            # Every interface, not the binaries' loopback default.
            self.assertFalse(flags["listen"].startswith("127."), service)
            self.assertFalse(flags["metrics_listen"].startswith("127."), service)
            self.assertEqual(named_ports(container), {"grpc": grpc_port, "metrics": metrics_port})
            annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
            self.assertEqual(annotations.get("prometheus.io/scrape"), "true", service)
            self.assertEqual(annotations.get("prometheus.io/port"), str(metrics_port), service)
            self.assertEqual(annotations.get("prometheus.io/path"), "/metrics", service)

    def test_grpc_probes(self):
        for service in dt.SERVICES:
            _, _, container = dt.kennel_container(self.objects, service)
            grpc_port = named_ports(container)["grpc"]
            for probe in ("readinessProbe", "livenessProbe"):
                self.assertIn(probe, container, f"{service} has no {probe}")
                self.assertIn("grpc", container[probe], f"{service} {probe} is not a gRPC probe")
                self.assertEqual(container[probe]["grpc"]["port"], grpc_port, f"{service} {probe}")
            if "startupProbe" in container:
                self.assertEqual(container["startupProbe"]["grpc"]["port"], grpc_port)
            # Readiness asks for the service itself, so a server that has not
            # registered it (or reports it NOT_SERVING) takes no traffic.
            self.assertEqual(container["readinessProbe"]["grpc"].get("service"),
                             HEALTH_NAMES[service], service)
            # Liveness asks for the name that stays SERVING while the process
            # runs, so waiting for a model is not a reason to restart.
            self.assertEqual(container["livenessProbe"]["grpc"].get("service"),
                             "liveness", service)

    def test_drain_fits_in_grace_period(self):
        for service in dt.SERVICES:
            _, spec, container = dt.kennel_container(self.objects, service)
            flags = kennel_flags(self.objects, service)
            self.assertIn("drain_seconds", flags, f"{service} sets no --drain-seconds")
            sleep = prestop_sleep(container)
            self.assertIsNotNone(sleep, f"{service} has no preStop pause")
            self.assertGreater(sleep, 0)
            grace = spec.get("terminationGracePeriodSeconds", 30)
            self.assertGreaterEqual(grace, sleep + float(flags["drain_seconds"]) + 1,
                                    f"{service}: preStop {sleep}s + drain {flags['drain_seconds']}s "
                                    f"does not fit in terminationGracePeriodSeconds {grace}")

    def test_every_container_has_resources(self):
        for o, spec, _ in dt.pod_templates(self.objects):
            for c in spec.get("initContainers", []) + spec["containers"]:
                where = f"{o['kind']}/{o['metadata']['name']}/{c['name']}"
                requests = c.get("resources", {}).get("requests", {})
                self.assertIn("cpu", requests, where)
                self.assertIn("memory", requests, where)
                self.assertIn("memory", c["resources"].get("limits", {}), where)

    def test_every_pod_is_locked_down(self):
        for o, spec, _ in dt.pod_templates(self.objects):
            pod_sc = spec.get("securityContext", {})
            self.assertEqual(pod_sc.get("seccompProfile", {}).get("type"), "RuntimeDefault",
                             o["metadata"]["name"])
            self.assertFalse(spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"))
            for v in spec.get("volumes", []):
                self.assertNotIn("hostPath", v, o["metadata"]["name"])
            for c in spec.get("initContainers", []) + spec["containers"]:
                where = f"{o['metadata']['name']}/{c['name']}"
                sc = c.get("securityContext", {})
                non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
                user = sc.get("runAsUser", pod_sc.get("runAsUser"))
                self.assertTrue(non_root, f"{where}: runAsNonRoot")
                self.assertIsNotNone(user, f"{where}: numeric runAsUser")
                self.assertNotEqual(user, 0, where)
                self.assertIs(sc.get("allowPrivilegeEscalation"), False, where)
                self.assertIs(sc.get("readOnlyRootFilesystem"), True, where)
                self.assertIn("ALL", sc.get("capabilities", {}).get("drop", []), where)
                self.assertFalse(sc.get("privileged", False), where)

    def test_inference_cpu_matches_threads(self):
        _, _, container = dt.kennel_container(self.objects, "inference")
        threads = int(kennel_flags(self.objects, "inference")["threads"])
        self.assertGreater(threads, 0)
        resources = container["resources"]
        self.assertEqual(cpu_cores(resources["requests"]["cpu"]), threads)
        self.assertEqual(cpu_cores(resources["limits"]["cpu"]), threads)
        # Guaranteed QoS: memory request = limit as well.
        self.assertEqual(resources["requests"]["memory"], resources["limits"]["memory"])

    def test_trainer_cpu_request_matches_threads(self):
        _, _, container = dt.kennel_container(self.objects, "trainer")
        threads = int(kennel_flags(self.objects, "trainer")["threads"])
        self.assertEqual(cpu_cores(container["resources"]["requests"]["cpu"]), threads)

    def test_gpu_on_trainer_only(self):
        for o, spec, _ in dt.pod_templates(self.objects):
            for c in spec["containers"]:
                resources = c.get("resources", {})
                gpus = {**resources.get("requests", {}), **resources.get("limits", {})}
                if "nvidia.com/gpu" in gpus:
                    self.assertEqual(o["metadata"]["name"], "kennel-trainer",
                                     f"{o['metadata']['name']} asks for a GPU")

    def test_hpa_targets_inference(self):
        hpas = self.of_kind("HorizontalPodAutoscaler")
        self.assertEqual(len(hpas), 1)
        hpa = hpas[0]
        self.assertEqual(hpa["apiVersion"], "autoscaling/v2")
        ref = hpa["spec"]["scaleTargetRef"]
        self.assertEqual((ref["apiVersion"], ref["kind"], ref["name"]),
                         ("apps/v1", "Deployment", "kennel-inference"))
        deployment, _, _ = dt.kennel_container(self.objects, "inference")
        self.assertNotIn("replicas", deployment["spec"],
                         "the HPA owns the replica count; re-applying must not reset it")
        self.assertLessEqual(hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"])
        metrics = hpa["spec"]["metrics"]
        self.assertTrue(any(m["type"] == "Resource" and m["resource"]["name"] == "cpu"
                            for m in metrics))

    def test_pdbs_target_one_deployment_each(self):
        pdbs = self.of_kind("PodDisruptionBudget")
        templates = dt.pod_templates(self.objects)
        targets = set()
        for pdb in pdbs:
            selected = [o["metadata"]["name"] for o, _, labels in templates
                        if dt.matches(pdb["spec"]["selector"], labels)]
            self.assertEqual(len(selected), 1,
                             f"PDB {pdb['metadata']['name']} selects {selected}")
            targets.add(selected[0])
            # A budget of zero would block every node drain.
            self.assertNotIn("minAvailable", pdb["spec"])
            self.assertGreaterEqual(pdb["spec"]["maxUnavailable"], 1)
        self.assertIn("kennel-inference", targets)

    def test_services_select_existing_pods_and_ports(self):
        templates = dt.pod_templates(self.objects)
        for svc in self.of_kind("Service"):
            name = svc["metadata"]["name"]
            selector = svc["spec"].get("selector")
            self.assertTrue(selector, f"Service {name} has no selector")
            pods = [(o, spec) for o, spec, labels in templates
                    if dt.matches({"matchLabels": selector}, labels)]
            self.assertTrue(pods, f"Service {name} selects no pods")
            for o, spec in pods:
                ports = {}
                for c in spec["containers"]:
                    ports.update(named_ports(c))
                for p in svc["spec"]["ports"]:
                    target = p.get("targetPort", p["port"])
                    if isinstance(target, str):
                        self.assertIn(target, ports, f"Service {name} -> {o['metadata']['name']}")
                    else:
                        self.assertIn(target, ports.values(), f"Service {name}")
        for service in dt.SERVICES:
            svc = next(s for s in self.of_kind("Service")
                       if s["metadata"]["name"] == f"kennel-{service}")
            grpc_port, metrics_port = dt.default_ports()[service]
            self.assertEqual({p["name"]: p["port"] for p in svc["spec"]["ports"]},
                             {"grpc": grpc_port, "metrics": metrics_port})

    def test_inference_service_is_headless(self):
        svc = next(s for s in self.of_kind("Service") if s["metadata"]["name"] == "kennel-inference")
        self.assertEqual(svc["spec"].get("clusterIP"), "None",
                         "gRPC clients balance per call across the pods' addresses")

    def test_clients_address_the_registry_service(self):
        grpc_port = dt.default_ports()["registry"][0]
        for service in ("trainer", "inference"):
            self.assertEqual(kennel_flags(self.objects, service)["registry"],
                             f"kennel-registry:{grpc_port}")

    def test_referenced_configmaps_and_secrets_exist(self):
        have = {(o["kind"], o["metadata"]["name"]) for o in self.objects}
        external = PROD_EXTERNAL_SECRETS if self.overlay == "prod" else set()
        for o, spec, _ in dt.pod_templates(self.objects):
            refs = []
            for v in spec.get("volumes", []):
                if "secret" in v:
                    refs.append(("Secret", v["secret"]["secretName"]))
                if "configMap" in v:
                    refs.append(("ConfigMap", v["configMap"]["name"]))
                if "persistentVolumeClaim" in v:
                    refs.append(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]))
            for c in spec["containers"]:
                for e in c.get("env", []):
                    source = e.get("valueFrom", {})
                    if "secretKeyRef" in source:
                        refs.append(("Secret", source["secretKeyRef"]["name"]))
                    if "configMapKeyRef" in source:
                        refs.append(("ConfigMap", source["configMapKeyRef"]["name"]))
            for kind, name in refs:
                if kind == "Secret" and name in external:
                    continue
                self.assertIn((kind, name), have, f"{o['metadata']['name']} refers to {kind} {name}")
        if self.overlay == "prod":
            self.assertFalse([o for o in self.objects if o["kind"] == "Secret"],
                             "prod carries no credentials")

    def test_token_guards_mutating_services(self):
        for service in ("registry", "trainer"):
            self.assertTrue(kennel_flags(self.objects, service).get("token_file"), service)

    def test_network_paths(self):
        net = NetworkModel(self.objects)
        ports = dt.default_ports()
        registry, trainer, inference = (net.pod(f"kennel-{s}") for s in dt.SERVICES)
        outsider = NetworkModel.foreign_pod({"app": "other"}, "kennel")
        elsewhere = NetworkModel.foreign_pod({"app": "other"}, "default")
        prometheus = NetworkModel.foreign_pod({"app.kubernetes.io/name": "prometheus"}, "monitoring")
        dns = NetworkModel.foreign_pod({"k8s-app": "kube-dns"}, "kube-system")
        s3 = NetworkModel.ip(S3_ADDRESS)

        reg_grpc = ports["registry"][0]
        self.assertTrue(net.allows(inference, registry, reg_grpc))
        self.assertTrue(net.allows(trainer, registry, reg_grpc))
        for other in (outsider, elsewhere, NetworkModel.ip("10.1.2.3"), prometheus):
            self.assertFalse(net.allows(other, registry, reg_grpc), other)
        # Clients reach inference and the trainer; Prometheus every metrics port.
        self.assertTrue(net.allows(elsewhere, inference, ports["inference"][0]))
        self.assertTrue(net.allows(elsewhere, trainer, ports["trainer"][0]))
        for service, pod in zip(dt.SERVICES, (registry, trainer, inference)):
            self.assertTrue(net.allows(prometheus, pod, ports[service][1]), service)
            self.assertTrue(net.allows(pod, dns, 53), service)
        # Only the registry reaches S3.
        self.assertTrue(net.allows(registry, s3, 443))
        for name in net.pods:
            if name == "kennel-registry":
                continue
            self.assertFalse(net.allows(net.pod(name), s3, 443), f"{name} reaches S3")
        # Inference and trainer reach nothing but the registry (and DNS).
        for pod in (trainer, inference):
            self.assertFalse(net.allows(pod, NetworkModel.ip("1.1.1.1"), 80))
            self.assertFalse(net.allows(pod, outsider, 8080))


class DevOverlay(OverlayChecks, unittest.TestCase):
    overlay = "dev"

    def test_one_of_each(self):
        for service in dt.SERVICES:
            deployment, _, _ = dt.kennel_container(self.objects, service)
            self.assertEqual(deployment["spec"].get("replicas", 1), 1, service)
        hpa = self.of_kind("HorizontalPodAutoscaler")[0]
        self.assertEqual(hpa["spec"]["minReplicas"], 1)

    def test_minio_is_the_registry_store(self):
        flags = kennel_flags(self.objects, "registry")
        self.assertTrue(flags["storage"].startswith("s3://"), flags["storage"])
        self.assertEqual(flags["s3_endpoint"], "http://kennel-minio:9000")
        self.assertEqual(flags["s3_path_style"], "true")
        minio = next(s for s in self.of_kind("Service") if s["metadata"]["name"] == "kennel-minio")
        self.assertEqual(minio["spec"]["ports"][0]["port"], 9000)
        # The bucket the Job creates is the one the registry uses.
        job = next(o for o in self.of_kind("Job") if o["metadata"]["name"] == "kennel-minio-bucket")
        script = " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
        bucket = re.match(r"s3://([^/]+)", flags["storage"]).group(1)
        self.assertIn(f"mc mb --ignore-existing kennel/{bucket}", script)

    def test_minio_only_reached_by_registry(self):
        net = NetworkModel(self.objects)
        minio = net.pod("kennel-minio")
        self.assertTrue(net.allows(net.pod("kennel-registry"), minio, 9000))
        self.assertTrue(net.allows(net.pod("kennel-minio-bucket"), minio, 9000))
        for name in ("kennel-trainer", "kennel-inference"):
            self.assertFalse(net.allows(net.pod(name), minio, 9000), name)
        self.assertFalse(net.allows(NetworkModel.foreign_pod({}, "default"), minio, 9000))

    def test_cpu_trainer(self):
        _, spec, _ = dt.kennel_container(self.objects, "trainer")
        self.assertEqual(kennel_flags(self.objects, "trainer")["device"], "cpu")
        self.assertNotIn("nodeSelector", spec)


class ProdOverlay(OverlayChecks, unittest.TestCase):
    overlay = "prod"

    def test_trainer_on_gpu_nodes(self):
        _, spec, container = dt.kennel_container(self.objects, "trainer")
        self.assertGreaterEqual(int(container["resources"]["limits"]["nvidia.com/gpu"]), 1)
        self.assertEqual(spec["nodeSelector"], {"nvidia.com/gpu.present": "true"})
        self.assertIn({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                      spec["tolerations"])
        self.assertEqual(kennel_flags(self.objects, "trainer")["device"], "cuda")
        self.assertIn("kennel-trainer-cuda", container["image"])
        for service in ("registry", "inference"):
            _, other, _ = dt.kennel_container(self.objects, service)
            self.assertNotIn("tolerations", other, service)

    def test_more_inference_replicas_than_dev(self):
        dev = next(o for o in dt.render("overlays/dev") if o["kind"] == "HorizontalPodAutoscaler")
        prod = self.of_kind("HorizontalPodAutoscaler")[0]
        self.assertGreater(prod["spec"]["minReplicas"], dev["spec"]["minReplicas"])
        self.assertGreaterEqual(prod["spec"]["minReplicas"], 2)
        self.assertGreater(prod["spec"]["maxReplicas"], dev["spec"]["maxReplicas"])

    def test_external_s3_no_minio(self):
        flags = kennel_flags(self.objects, "registry")
        self.assertTrue(flags["storage"].startswith("s3://"))
        self.assertTrue(flags["s3_endpoint"].startswith("https://"), flags["s3_endpoint"])
        self.assertFalse([o for o in self.objects if "minio" in o["metadata"]["name"]])

    def test_service_monitor_scrapes_every_service(self):
        monitors = self.of_kind("ServiceMonitor")
        self.assertEqual(len(monitors), 1)
        monitor = monitors[0]
        services = [s for s in self.of_kind("Service")
                    if dt.matches(monitor["spec"]["selector"], s["metadata"].get("labels", {}))]
        self.assertEqual(sorted(s["metadata"]["name"] for s in services),
                         sorted(f"kennel-{s}" for s in dt.SERVICES))
        for endpoint in monitor["spec"]["endpoints"]:
            self.assertFalse(endpoint.get("honorLabels", False),
                             "the dashboard reads the trainer's job id as exported_job")
            for s in services:
                self.assertIn(endpoint["port"], [p["name"] for p in s["spec"]["ports"]])

    def test_prometheus_rule_matches_rule_file(self):
        rules = self.of_kind("PrometheusRule")
        self.assertEqual(len(rules), 1)
        with open(f"{dt.MONITORING_DIR}/kennel-alerts.rules.yaml") as f:
            rule_file = yaml.safe_load(f)
        self.assertEqual(rules[0]["spec"]["groups"], rule_file["groups"],
                         "prometheusrule.yaml and kennel-alerts.rules.yaml disagree")

    def test_dashboard_config_map(self):
        maps = [o for o in self.of_kind("ConfigMap")
                if o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
        self.assertEqual(len(maps), 1)
        with open(f"{dt.MONITORING_DIR}/kennel-dashboard.json") as f:
            self.assertEqual(maps[0]["data"]["kennel-dashboard.json"], f.read())


class Base(unittest.TestCase):
    """The base renders on its own and leaves placement to the overlays."""

    def test_base_renders_without_gpu(self):
        dt.require_kubectl()
        objects = dt.render("base")
        _, spec, container = dt.kennel_container(objects, "trainer")
        self.assertNotIn("nvidia.com/gpu", container["resources"].get("limits", {}))
        self.assertNotIn("nodeSelector", spec)


if __name__ == "__main__":
    dt.require_kubectl()
    unittest.main(verbosity=2)
