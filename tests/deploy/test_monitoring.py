"""Kennel's alert rules and Grafana dashboard against the real services.

promtool checks and unit-tests the rules. Then the three binaries start with
the flags the dev overlay gives them (addresses and folders swapped for
temporary ones, file storage for S3); a model is pushed and aliased, the
inference service follows it from the registry and classifies a good and a
bad image, and a two-trial search runs through the trainer and registers its
best trial. Then a real Prometheus scrapes all three with
deploy/prometheus/prometheus.yml and evaluates the rules. Every dashboard
query must run in that Prometheus, name only series the services export, and
show data; the dashboard's training-job variable must list the search's job.
"""

import copy
import hashlib
import io
import json
import os
import subprocess
import tempfile
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request

import yaml

import deploy_testlib as dt
import kennel_testlib as kt

RULES = os.path.join(dt.MONITORING_DIR, "kennel-alerts.rules.yaml")
RULE_TESTS = os.path.join(dt.HERE, "alerts_test.yaml")
DASHBOARD = os.path.join(dt.MONITORING_DIR, "kennel-dashboard.json")
PROMETHEUS_CONFIG = os.path.join(dt.DEPLOY_DIR, "prometheus", "prometheus.yml")

# Metric families contracts.md promises (histograms by their family name).
CONTRACT_FAMILIES = {
    "kennel_grpc_server_started_total", "kennel_grpc_server_handled_total",
    "kennel_grpc_server_handling_seconds", "kennel_build_info",
    "kennel_registry_bytes_received_total", "kennel_registry_bytes_sent_total",
    "kennel_registry_versions_committed_total", "kennel_registry_storage_errors_total",
    "kennel_registry_storage_seconds",
    "kennel_inference_latency_seconds", "kennel_inference_batch_size",
    "kennel_inference_queue_depth", "kennel_inference_model_info",
    "kennel_inference_model_ready", "kennel_inference_model_loads_total",
    "kennel_inference_requests_rejected_total",
    "kennel_trainer_jobs_total", "kennel_trainer_jobs_running", "kennel_trainer_epoch",
    "kennel_trainer_train_loss", "kennel_trainer_valid_loss", "kennel_trainer_valid_accuracy",
    "kennel_trainer_images_per_second", "kennel_trainer_data_wait_share",
    "kennel_trainer_feature_cache_hits_total", "kennel_trainer_feature_cache_misses_total",
    "kennel_tune_trials_total", "kennel_tune_best_objective", "kennel_tune_trial_objective",
}

# Series the dashboard and alerts may read although the running services do
# not export them yet (contract names that need an event this test cannot
# cause). Empty: the test serves a model, classifies a good and a bad image
# and runs a search, which brings every series the dashboard reads into
# being. Keep it that way; a name added here is checked only against
# CONTRACT_FAMILIES.
LATER = frozenset()

# The one dashboard panel that stays empty in this test: no job failed.
EMPTY_WITHOUT_FAILURES = "'Jobs failed (24h)'"

MODEL_NAME = "deploytest"
TOKEN = "deploy-test-token"


def family(series):
    for suffix in ("_bucket", "_sum", "_count"):
        if series.endswith(suffix) and series[:-len(suffix)] in CONTRACT_FAMILIES:
            return series[:-len(suffix)]
    return series


def rule_expressions():
    with open(RULES) as f:
        groups = yaml.safe_load(f)["groups"]
    return [(r["alert"], r["expr"]) for g in groups for r in g["rules"]]


class RuleFiles(unittest.TestCase):
    def test_promtool_check_rules(self):
        r = subprocess.run(["promtool", "check", "rules", RULES],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("SUCCESS", r.stdout)

    def test_promtool_test_rules(self):
        r = subprocess.run(["promtool", "test", "rules", RULE_TESTS],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_rule_tests_cover_error_rate_and_no_model(self):
        with open(RULE_TESTS) as f:
            tests = yaml.safe_load(f)["tests"]
        firing = {t["alertname"] for case in tests for t in case.get("alert_rule_test", [])
                  if t.get("exp_alerts")}
        quiet = {t["alertname"] for case in tests for t in case.get("alert_rule_test", [])
                 if not t.get("exp_alerts")}
        alerts = {name for name, _ in rule_expressions()}
        # Every alert is shown to fire and shown to stay quiet.
        self.assertEqual(firing, alerts)
        self.assertEqual(quiet, alerts)

    def test_the_issue_alerts_exist(self):
        alerts = dict(rule_expressions())
        for name, metric in [
                ("KennelInferenceErrorRateHigh", "kennel_grpc_server_handled_total"),
                ("KennelInferenceLatencyP99High", "kennel_inference_latency_seconds_bucket"),
                ("KennelInferenceModelLoadFailed", "kennel_inference_model_loads_total"),
                ("KennelInferenceNoModelLoaded", "kennel_inference_model_ready"),
                ("KennelTrainerJobFailed", "kennel_trainer_jobs_total"),
                ("KennelRegistryStorageErrors", "kennel_registry_storage_errors_total")]:
            self.assertIn(name, alerts)
            self.assertIn(metric, dt.promql_metric_names(alerts[name]), name)


class DashboardFile(unittest.TestCase):
    def setUp(self):
        with open(DASHBOARD) as f:
            self.dashboard = json.load(f)

    def test_panels_are_well_formed(self):
        ids = []

        def walk(panels):
            for p in panels:
                ids.append(p["id"])
                pos = p["gridPos"]
                self.assertLessEqual(pos["x"] + pos["w"], 24, p["title"])
                if p["type"] != "row":
                    self.assertEqual(p["datasource"], {"type": "prometheus", "uid": "${datasource}"})
                    self.assertTrue(p["targets"], p["title"])
                    for t in p["targets"]:
                        self.assertEqual(t["datasource"]["uid"], "${datasource}")
                walk(p.get("panels", []))
        walk(self.dashboard["panels"])
        self.assertEqual(len(ids), len(set(ids)), "panel ids repeat")
        self.assertEqual(self.dashboard["uid"], "kennel-overview")

    def test_covers_what_the_issue_asks(self):
        used = {}
        for where, expr in dt.dashboard_queries(self.dashboard):
            for name in dt.promql_metric_names(dt.grafana_expand(expr)):
                used.setdefault(name, []).append(expr)
        for name in ["kennel_grpc_server_handled_total",          # request rate, errors
                     "kennel_inference_latency_seconds_bucket",   # latency quantiles
                     "kennel_inference_batch_size_bucket",        # batch sizes
                     "kennel_inference_model_info",               # serving version over time
                     "kennel_trainer_train_loss", "kennel_trainer_valid_loss",
                     "kennel_tune_trial_objective"]:              # leaderboard
            self.assertIn(name, used)
        self.assertTrue(any("histogram_quantile(0.99" in e
                            for e in used["kennel_inference_latency_seconds_bucket"]))
        titles = json.dumps(self.dashboard["panels"])
        self.assertIn("Tuning leaderboard", titles)

    def test_later_list_is_contract_and_used(self):
        used = set()
        for _, expr in dt.dashboard_queries(self.dashboard):
            used |= dt.promql_metric_names(dt.grafana_expand(expr))
        for _, expr in rule_expressions():
            used |= dt.promql_metric_names(expr)
        for name in LATER:
            self.assertIn(family(name), CONTRACT_FAMILIES, name)
            self.assertIn(name, used, f"{name} is in LATER but nothing reads it")
        for name in used:
            self.assertIn(family(name), CONTRACT_FAMILIES | {
                "process_resident_memory_bytes", "process_cpu_seconds_total"},
                f"{name} is not a metric contracts.md names")


def http_json(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


class LiveStack(unittest.TestCase):
    """The services as the dev overlay runs them, scraped by Prometheus."""

    @classmethod
    def setUpClass(cls):
        # The services start with the dev overlay's flags, which kubectl renders.
        dt.skip_without_kubectl(cls)
        cls.tmp = tempfile.mkdtemp(prefix="kennel-deploy-live-")
        cls.procs = []
        cls.objects = dt.render("overlays/dev")
        token_file = os.path.join(cls.tmp, "token")
        with open(token_file, "w") as f:
            f.write(TOKEN + "\n")
        cls.token_file = token_file

        cls.registry = cls.start("registry", {
            "storage": f"file://{cls.tmp}/store", "token_file": token_file},
            drop={"s3_endpoint", "s3_region", "s3_path_style"})
        cls.push_model()
        cls.trainer = cls.start("trainer", {
            "registry": cls.registry.addr, "token_file": token_file,
            "data_root": cls.make_data_root(), "cache_dir": f"{cls.tmp}/tcache",
            "jobs_dir": f"{cls.tmp}/jobs"})
        cls.inference = cls.start("inference", {
            "registry": cls.registry.addr, "model": f"{MODEL_NAME}@production",
            "cache_dir": f"{cls.tmp}/icache"})
        cls.classify()
        cls.job_id = cls.run_tune()
        cls.start_prometheus()

    @classmethod
    def tearDownClass(cls):
        for p in getattr(cls, "procs", []):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        for s in ("inference", "trainer", "registry"):
            if hasattr(cls, s):
                getattr(cls, s).stop()

    @classmethod
    def start(cls, service, replace, drop=()):
        """kennel-<service> with the dev overlay's flags; `replace` swaps
        values that name cluster addresses or volumes."""
        _, _, container = dt.kennel_container(cls.objects, service)
        flags = {}
        for name, value in dt.parse_flags(container["args"]).items():
            flags[name] = dt.resolve_env(cls.objects, container, value)
        missing = sorted(set(replace) - set(flags))
        assert not missing, f"the dev overlay gives kennel-{service} no {missing}"
        flags.update(replace)
        for name in list(drop) + ["listen", "metrics_listen"]:
            flags.pop(name, None)  # kennel_testlib picks free ports
        unknown = sorted(set(flags) - dt.binary_flags(service))
        assert not unknown, (f"kennel-{service} does not accept {['--' + f for f in unknown]}, "
                             f"which k8s/ passes")
        for folder in ("data_root", "cache_dir", "jobs_dir"):
            if folder in flags:
                os.makedirs(flags[folder], exist_ok=True)
        args = [f"--{name.replace('_', '-')}={value}" for name, value in flags.items()]
        return kt.Service(service, *args, workdir=cls.tmp).start(timeout=60)

    @classmethod
    def push_model(cls):
        from google.protobuf import json_format
        from kennel.v1 import common_pb2, registry_pb2, registry_pb2_grpc
        import torch
        path = kt.export_test_model(os.path.join(cls.tmp, "model.pt"), num_classes=3, size=32)
        with open(path, "rb") as f:
            data = f.read()
        module = torch.jit.load(path)
        header = registry_pb2.PushHeader(
            name=MODEL_NAME, labels=list(module.labels), aliases=["production"],
            precision=common_pb2.PRECISION_FP32,
            components=[registry_pb2.ComponentSpec(
                role=common_pb2.COMPONENT_ROLE_MODEL, format="torchscript",
                digest="sha256:" + hashlib.sha256(data).hexdigest(), size=len(data))])
        json_format.Parse(module.kennel_preprocessing, header.preprocessing)

        def requests():
            yield registry_pb2.PushModelRequest(header=header)
            for offset in range(0, len(data), 1 << 20):
                yield registry_pb2.PushModelRequest(chunk=common_pb2.Chunk(
                    component=0, offset=offset, data=data[offset:offset + (1 << 20)]))
        stub = registry_pb2_grpc.ModelRegistryStub(kt.channel(cls.registry.addr))
        stub.PushModel(requests(), timeout=60,
                       metadata=[("authorization", f"Bearer {TOKEN}")])

    @classmethod
    def make_data_root(cls):
        """A small Fashion-MNIST folder and a small CNN backbone under the
        trainer's data root."""
        root = os.path.join(cls.tmp, "data")
        os.makedirs(root)
        kt.kennel("dataset", "fashion-mnist", os.path.join(root, "fm"), "--limit", 8,
                  check=True, timeout=120)
        subprocess.run([kt.PYTHON, os.path.join(kt.SOURCE_DIR, "tools", "export_backbone.py"),
                        "--arch", "small_cnn", "--weights", "random", "--seed", "1",
                        "--out", os.path.join(root, "small_cnn.pt")],
                       check=True, capture_output=True, timeout=300)
        return root

    @classmethod
    def classify(cls):
        """One good image (once the model is loaded) and one that is not an
        image, so that the latency, batch and error series all have data."""
        import grpc
        from PIL import Image
        from kennel.v1 import inference_pb2, inference_pb2_grpc
        buf = io.BytesIO()
        Image.new("RGB", (48, 40), (200, 30, 90)).save(buf, format="PNG")
        stub = inference_pb2_grpc.ClassifierStub(kt.channel(cls.inference.addr))
        request = inference_pb2.ClassifyRequest(image=buf.getvalue(), top_k=2)

        def answered():
            try:
                return stub.Classify(request, timeout=10)
            except grpc.RpcError as e:  # UNAVAILABLE until the model is loaded
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                return None
        response = kt.wait_until(answered, timeout=90, interval=0.5,
                                 what="inference to load the pushed model and answer")
        assert response.model_name == MODEL_NAME, response
        try:
            stub.Classify(inference_pb2.ClassifyRequest(image=b"not an image"), timeout=10)
            raise AssertionError("a request that is not an image was answered")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e

    @classmethod
    def run_tune(cls):
        """A two-trial search through the CLI with the token, registering its
        best trial through the trainer's registry flags; returns its job id."""
        from kennel.v1 import trainer_pb2, trainer_pb2_grpc
        result = kt.kennel(
            "tune", "--data", "fm", "--backbone", "small_cnn.pt", "--trials", 2,
            "--parallel", 1, "--strategy", "grid", "--lr", "0.01,0.05", "--batch-size", 16,
            "--epochs", 2, "--no-early-stopping", "--seed", 1, "--register-as", "deploytune",
            "--token-file", cls.token_file, addr=cls.trainer.addr, timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "registered deploytune:1" in result.stdout, result.stdout
        stub = trainer_pb2_grpc.TrainerStub(kt.channel(cls.trainer.addr))
        jobs = stub.ListJobs(trainer_pb2.ListJobsRequest(limit=1), timeout=30).jobs
        assert jobs and jobs[0].kind == trainer_pb2.JOB_KIND_TUNE, jobs
        return jobs[0].id

    @classmethod
    def start_prometheus(cls):
        with open(PROMETHEUS_CONFIG) as f:
            config = yaml.safe_load(f)
        targets = {"kennel-registry": cls.registry, "kennel-trainer": cls.trainer,
                   "kennel-inference": cls.inference}
        cls.port = kt.free_port()
        live = copy.deepcopy(config)
        live["global"].update({"scrape_interval": "1s", "scrape_timeout": "1s",
                               "evaluation_interval": "1s"})
        live["rule_files"] = [RULES]
        for job in live["scrape_configs"]:
            name = job["job_name"]
            if name in targets:
                job["static_configs"] = [{"targets": [f"127.0.0.1:{targets[name].metrics_port}"]}]
            elif name == "prometheus":
                job["static_configs"] = [{"targets": [f"127.0.0.1:{cls.port}"]}]
        assert set(targets) <= {j["job_name"] for j in live["scrape_configs"]}
        path = os.path.join(cls.tmp, "prometheus.yml")
        with open(path, "w") as f:
            yaml.safe_dump(live, f)
        check = subprocess.run(["promtool", "check", "config", path],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        with open(os.path.join(cls.tmp, "prometheus.log"), "w") as log:
            cls.procs.append(subprocess.Popen(
                ["prometheus", f"--config.file={path}", f"--storage.tsdb.path={cls.tmp}/tsdb",
                 f"--web.listen-address=127.0.0.1:{cls.port}"],
                stdout=log, stderr=subprocess.STDOUT))
        cls.api = f"http://127.0.0.1:{cls.port}/api/v1"

        def all_up():
            result = cls.query("up")
            up = {r["metric"]["job"]: r["value"][1] for r in result}
            return all(up.get(job) == "1" for job in targets) and up
        kt.wait_until(all_up, timeout=60, interval=0.5, what="Prometheus to scrape all three")

        # Two more scrapes, so rates and the post-classify series exist, and
        # the rules have been evaluated against them.
        def rules_evaluated():
            groups = http_json(f"{cls.api}/rules")["data"]["groups"]
            return groups and all(not r["lastEvaluation"].startswith("0001")
                                  for g in groups for r in g["rules"])
        time.sleep(3)
        kt.wait_until(rules_evaluated, timeout=30, interval=0.5, what="rule evaluation")

    @classmethod
    def query(cls, expr):
        url = f"{cls.api}/query?" + urllib.parse.urlencode({"query": expr})
        try:
            body = http_json(url)
        except urllib.error.HTTPError as e:
            raise AssertionError(f"Prometheus rejected {expr!r}: {e.read().decode()}")
        assert body["status"] == "success", body
        return body["data"]["result"]

    def live_names(self):
        return set(http_json(f"{self.api}/label/__name__/values")["data"])

    def test_scrape_config_jobs_and_services(self):
        services = {r["metric"]["job"]: r["metric"]["service"]
                    for r in self.query("kennel_build_info")}
        self.assertEqual(services, {"kennel-registry": "kennel-registry",
                                    "kennel-trainer": "kennel-trainer",
                                    "kennel-inference": "kennel-inference"})

    def test_dashboard_queries_run_and_name_real_series(self):
        with open(DASHBOARD) as f:
            dashboard = json.load(f)
        names = self.live_names()
        # The tuning job this test ran is the one the dashboard shows; a
        # window long enough to hold the calls made before Prometheus started.
        variables = dict(dt.GRAFANA_VARIABLES, training_job=self.job_id, __rate_interval="5m")
        problems = []
        empty = []
        for where, expr in dt.dashboard_queries(dashboard):
            expanded = dt.grafana_expand(expr, variables)
            try:
                if not self.query(expanded):
                    empty.append(where)
            except AssertionError as e:
                problems.append(f"{where}: {e}")
            for name in dt.promql_metric_names(expanded):
                if name not in names and name not in LATER:
                    problems.append(f"{where}: {name} is not exported by the running services")
        self.assertFalse(problems, "\n".join(problems))
        # With a model serving, one good and one bad image classified and a
        # search run, every panel has something to show but the count of
        # failed jobs (there were none).
        self.assertEqual(empty, [w for w, _ in dt.dashboard_queries(dashboard)
                                 if EMPTY_WITHOUT_FAILURES in w],
                         f"panels without data: {empty}")

    def test_training_job_variable_lists_the_job(self):
        with open(DASHBOARD) as f:
            dashboard = json.load(f)
        variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "training_job")
        selector, label = dt.label_values(variable["query"]["query"])
        values = {r["metric"].get(label) for r in self.query(selector)}
        # Prometheus keeps the trainer's own `job` label as exported_job.
        self.assertIn(self.job_id, values)
        leaderboard = self.query(f'max by (trial) (kennel_tune_trial_objective{{exported_job="{self.job_id}"}})')
        self.assertEqual(sorted(r["metric"]["trial"] for r in leaderboard), ["1", "2"])

    def test_rules_evaluate_and_name_real_series(self):
        names = self.live_names()
        for alert, expr in rule_expressions():
            for name in dt.promql_metric_names(expr):
                self.assertTrue(name in names or name in LATER,
                                f"{alert} reads {name}, which no service exports")
        groups = http_json(f"{self.api}/rules")["data"]["groups"]
        for g in groups:
            for r in g["rules"]:
                self.assertEqual(r["health"], "ok", f"{r['name']}: {r.get('lastError')}")

    def test_serving_metrics_describe_the_loaded_model(self):
        ready = self.query("kennel_inference_model_ready")
        self.assertEqual([r["value"][1] for r in ready], ["1"])
        info = self.query("kennel_inference_model_info == 1")
        self.assertEqual(len(info), 1)
        self.assertEqual(info[0]["metric"]["name"], MODEL_NAME)
        self.assertEqual(info[0]["metric"]["version"], "1")
        # The alerts about a missing model stay quiet while one serves.
        firing = {a["labels"]["alertname"] for a in http_json(f"{self.api}/alerts")["data"]["alerts"]}
        self.assertNotIn("KennelInferenceNoModelLoaded", firing)
        self.assertNotIn("KennelInferenceNothingServing", firing)
        # The one classification went through the batcher and the histograms.
        batches = self.query("sum(kennel_inference_batch_size_count)")
        self.assertGreaterEqual(float(batches[0]["value"][1]), 1)
        latency = self.query('sum(kennel_inference_latency_seconds_count{stage="total"})')
        self.assertGreaterEqual(float(latency[0]["value"][1]), 1)


if __name__ == "__main__":
    for tool in ("promtool", "prometheus"):
        kt.require(tool, "install Debian's prometheus package (scripts/setup.sh does)")
    unittest.main(verbosity=2)
