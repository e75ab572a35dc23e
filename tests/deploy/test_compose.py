"""deploy/compose.yaml: it parses, passes only flags the binaries accept
(read from their --helpfull now), passes the same flags as the Kubernetes
dev overlay, and wires Prometheus and Grafana to files that exist.
"""

import json
import os
import re
import unittest

import yaml

import deploy_testlib as dt

COMPOSE = os.path.join(dt.DEPLOY_DIR, "compose.yaml")
COMPOSE_GPU = os.path.join(dt.DEPLOY_DIR, "compose.gpu.yaml")


def load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def dockerfile_stages(path):
    with open(os.path.join(dt.SOURCE_DIR, path)) as f:
        return set(re.findall(r"^FROM \S+ AS (\S+)$", f.read(), re.M))


def compose_interpolate(value):
    """${VAR:-default} -> default (what compose uses when VAR is unset)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def host_path(volume):
    source = volume.split(":")[0]
    return os.path.normpath(os.path.join(dt.DEPLOY_DIR, compose_interpolate(source)))


class Compose(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.compose = load(COMPOSE)
        cls.services = cls.compose["services"]

    def flags(self, service, document=None):
        spec = (document or self.compose)["services"][service]
        return {k: compose_interpolate(v) for k, v in dt.parse_flags(spec["command"]).items()}

    def test_has_the_stack(self):
        self.assertLessEqual({"registry", "trainer", "inference", "minio", "prometheus", "grafana"},
                             set(self.services))

    def test_flags_exist_in_binaries(self):
        problems = []
        for document in (self.compose, load(COMPOSE_GPU)):
            for service in dt.SERVICES:
                if service not in document["services"]:
                    continue
                unknown = sorted(set(self.flags(service, document)) - dt.binary_flags(service))
                if unknown:
                    problems.append(f"kennel-{service} does not accept "
                                    f"{['--' + f for f in unknown]}")
        self.assertFalse(problems, "\n".join(problems))

    def test_same_flags_as_kubernetes(self):
        dt.skip_without_kubectl(self)
        from test_k8s_manifests import kennel_flags
        objects = dt.render("overlays/dev")
        for service in dt.SERVICES:
            self.assertEqual(sorted(self.flags(service)), sorted(kennel_flags(objects, service)),
                             f"compose and k8s/overlays/dev pass kennel-{service} different flags")
            # Settings that are not addresses or paths take the same values.
            k8s = kennel_flags(objects, service)
            for name in ("listen", "metrics_listen", "drain_seconds", "max_batch_size",
                         "max_queue", "max_queue_delay", "precision", "device",
                         "max_concurrent_jobs", "storage", "s3_region", "s3_path_style"):
                if name in k8s:
                    self.assertEqual(self.flags(service)[name], k8s[name], f"{service} --{name}")

    def test_gpu_override_keeps_the_flags(self):
        gpu = load(COMPOSE_GPU)
        self.assertEqual(sorted(self.flags("trainer", gpu)), sorted(self.flags("trainer")))
        self.assertEqual(self.flags("trainer", gpu)["device"], "cuda")
        self.assertEqual(gpu["services"]["trainer"]["build"]["dockerfile"],
                         "deploy/Dockerfile.trainer-cuda")
        # The base file's build target carries over to the override.
        self.assertIn(self.services["trainer"]["build"]["target"],
                      dockerfile_stages("deploy/Dockerfile.trainer-cuda"))
        devices = gpu["services"]["trainer"]["deploy"]["resources"]["reservations"]["devices"]
        self.assertEqual(devices[0]["capabilities"], ["gpu"])

    def test_kennel_services(self):
        defaults = dt.default_ports()
        stages = dockerfile_stages("deploy/Dockerfile")
        for service in dt.SERVICES:
            spec = self.services[service]
            flags = self.flags(service)
            grpc_port, metrics_port = defaults[service]
            self.assertEqual(dt.port_of(flags["listen"]), grpc_port)
            self.assertEqual(dt.port_of(flags["metrics_listen"]), metrics_port)
            self.assertIn(f"127.0.0.1:{grpc_port}:{grpc_port}", spec["ports"])
            self.assertEqual(spec["build"]["dockerfile"], "deploy/Dockerfile")
            self.assertIn(spec["build"]["target"], stages)
            self.assertEqual(spec["build"]["context"], "..")
            self.assertEqual(spec["user"], "10001:10001")
            self.assertIs(spec["read_only"], True)
            self.assertEqual(spec["cap_drop"], ["ALL"])
            self.assertIn("no-new-privileges:true", spec["security_opt"])
            # The drain fits in the stop grace period.
            grace = int(spec["stop_grace_period"].rstrip("s"))
            self.assertGreaterEqual(grace, float(flags["drain_seconds"]), service)
            self.assertNotIn("healthcheck", spec)
            if "registry" in flags:
                self.assertEqual(flags["registry"], f"registry:{defaults['registry'][0]}")
        # As in Kubernetes: inference gets as many CPUs as --threads.
        self.assertEqual(float(self.services["inference"]["cpus"]),
                         float(self.flags("inference")["threads"]))

    def test_registry_uses_minio(self):
        flags = self.flags("registry")
        self.assertEqual(flags["s3_endpoint"], "http://minio:9000")
        bucket = re.match(r"s3://([^/]+)", flags["storage"]).group(1)
        self.assertIn(f"mc mb --ignore-existing kennel/{bucket}",
                      " ".join(self.services["minio-bucket"]["command"]))
        env = self.services["registry"]["environment"]
        minio = self.services["minio"]["environment"]
        self.assertEqual(env["AWS_ACCESS_KEY_ID"], minio["MINIO_ROOT_USER"])
        self.assertEqual(env["AWS_SECRET_ACCESS_KEY"], minio["MINIO_ROOT_PASSWORD"])
        self.assertEqual(self.services["registry"]["depends_on"]["minio-bucket"]["condition"],
                         "service_completed_successfully")

    def test_token_file_is_the_secret(self):
        secrets = self.compose["secrets"]
        for service in ("registry", "trainer"):
            name = self.services[service]["secrets"][0]
            self.assertEqual(self.flags(service)["token_file"], f"/run/secrets/{name}")
            self.assertTrue(os.path.isfile(os.path.join(dt.DEPLOY_DIR, secrets[name]["file"])))

    def test_prometheus_scrapes_all_three(self):
        spec = self.services["prometheus"]
        mounts = {v.split(":")[1]: host_path(v) for v in spec["volumes"] if v.startswith(".")}
        config_path = mounts["/etc/prometheus/prometheus.yml"]
        config = load(config_path)
        targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
        for service in dt.SERVICES:
            port = dt.port_of(self.flags(service)["metrics_listen"])
            self.assertEqual(targets[f"kennel-{service}"], [f"{service}:{port}"])
        self.assertFalse(any(j.get("honor_labels") for j in config["scrape_configs"]),
                         "the dashboard reads the trainer's job id as exported_job")
        # The rule files it loads are mounted, and are Kennel's rules.
        rules = [m for m in mounts if m.startswith("/etc/prometheus/rules/")]
        self.assertEqual(config["rule_files"], ["/etc/prometheus/rules/*.yaml"])
        self.assertEqual([mounts[m] for m in rules],
                         [os.path.join(dt.MONITORING_DIR, "kennel-alerts.rules.yaml")])

    def test_grafana_provisioning(self):
        spec = self.services["grafana"]
        mounts = {v.split(":")[1]: host_path(v) for v in spec["volumes"] if v.startswith(".")}
        provisioning = mounts["/etc/grafana/provisioning"]
        datasource = load(os.path.join(provisioning, "datasources", "prometheus.yaml"))
        self.assertEqual(datasource["datasources"][0]["url"], "http://prometheus:9090")
        self.assertEqual(datasource["datasources"][0]["type"], "prometheus")
        provider = load(os.path.join(provisioning, "dashboards", "kennel.yaml"))["providers"][0]
        folder = provider["options"]["path"]
        dashboards = {m: p for m, p in mounts.items() if m.startswith(folder + "/")}
        self.assertEqual(list(dashboards.values()),
                         [os.path.join(dt.MONITORING_DIR, "kennel-dashboard.json")])
        with open(list(dashboards.values())[0]) as f:
            self.assertEqual(json.load(f)["uid"], "kennel-overview")
        self.assertIn(spec["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"], dashboards)

    def test_bind_mounts_exist(self):
        for name, spec in self.services.items():
            for v in spec.get("volumes", []):
                if not v.startswith((".", "$")):
                    continue  # a named volume
                if "KENNEL_DATA" in v:
                    continue  # the data set folder is the user's
                self.assertTrue(os.path.exists(host_path(v)), f"{name}: {v}")

    def test_named_volumes_declared(self):
        declared = set(self.compose.get("volumes", {}))
        for name, spec in self.services.items():
            for v in spec.get("volumes", []):
                if not v.startswith((".", "/", "$")):
                    self.assertIn(v.split(":")[0], declared, f"{name}: {v}")


if __name__ == "__main__":
    unittest.main(verbosity=2)
