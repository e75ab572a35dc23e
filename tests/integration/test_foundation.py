"""The plumbing every service shares, checked on the real binaries: health,
reflection, /metrics (promtool and a real Prometheus), TLS, flags, drain."""

import json
import os
import signal
import subprocess
import tempfile
import unittest
import urllib.parse
import urllib.request

import kennel_testlib as kt

import grpc
from grpc_std import health_pb2, health_pb2_grpc, reflection_pb2, reflection_pb2_grpc

SERVICES = {
    "registry": "kennel.v1.ModelRegistry",
    "trainer": "kennel.v1.Trainer",
    "inference": "kennel.v1.Classifier",
}


def server_args(kind, tmp, model=None):
    """Flags that keep a server's state inside the test's temp folder."""
    if kind == "registry":
        return [f"--storage=file://{tmp}/store"]
    if kind == "trainer":
        return [f"--jobs-dir={tmp}/jobs", f"--cache-dir={tmp}/cache", f"--data-root={tmp}"]
    return [f"--model-path={model}", f"--cache-dir={tmp}/icache"]


class FoundationTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="kennel-foundation-")
        cls.model = kt.export_test_model(os.path.join(cls.tmp, "model.pt"))
        cls.services = {}
        for kind in SERVICES:
            cls.services[kind] = kt.Service(kind, *server_args(kind, cls.tmp, cls.model),
                                            workdir=cls.tmp).start()

    @classmethod
    def tearDownClass(cls):
        for s in cls.services.values():
            s.stop()

    def test_health_is_serving_through_the_cli(self):
        for kind, service in self.services.items():
            kt.wait_until(lambda: kt.kennel("health", addr=service.addr).returncode == 0,
                          timeout=60, what=f"{kind} to report SERVING")
            out = kt.kennel("health", addr=service.addr, check=True).stdout
            self.assertIn("SERVING", out)
            named = kt.kennel("health", SERVICES[kind], addr=service.addr)
            self.assertEqual(named.returncode, 0, named.stderr)

    def test_a_command_sent_to_the_wrong_service_says_so(self):
        r = kt.kennel("models", "ls", addr=self.services["trainer"].addr)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("UNIMPLEMENTED", r.stderr)
        self.assertIn("is it the right service?", r.stderr)

    def test_health_is_serving_through_grpcio(self):
        for kind, service in self.services.items():
            stub = health_pb2_grpc.HealthStub(kt.channel(service.addr))

            def serving():
                r = stub.Check(health_pb2.HealthCheckRequest(service=SERVICES[kind]),
                               timeout=5)
                return r.status == health_pb2.HealthCheckResponse.SERVING
            kt.wait_until(serving, timeout=60, what=f"{kind} SERVING over grpcio")

    def test_liveness_is_serving_on_every_service(self):
        for kind, service in self.services.items():
            r = kt.kennel("health", "liveness", addr=service.addr)
            self.assertEqual(r.returncode, 0, f"{kind}: {r.stderr}")

    def test_health_of_an_unknown_service_is_not_found(self):
        r = kt.kennel("health", "no.such.Service", addr=self.services["registry"].addr)
        self.assertEqual(r.returncode, 1)
        self.assertIn("NOT_FOUND", r.stderr)

    def test_reflection_lists_each_service(self):
        for kind, service in self.services.items():
            stub = reflection_pb2_grpc.ServerReflectionStub(kt.channel(service.addr))
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            responses = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
            names = {s.name for s in responses[0].list_services_response.service}
            self.assertIn(SERVICES[kind], names)
            self.assertIn("grpc.health.v1.Health", names)

    def test_metrics_pass_promtool(self):
        kt.require("promtool", "install Debian's prometheus package")
        for kind, service in self.services.items():
            # One RPC first, so the interceptor's families have samples.
            kt.kennel("health", addr=service.addr)
            text = service.scrape()
            self.assertIn("kennel_grpc_server_handled_total", text)
            self.assertIn("process_resident_memory_bytes", text)
            self.assertIn(f'kennel_build_info{{service="kennel-{kind}"', text)
            check = subprocess.run(["promtool", "check", "metrics"], input=text,
                                   capture_output=True, text=True)
            # promtool exits 0 when it only has style remarks, 1 on errors.
            self.assertEqual(check.returncode, 0, check.stdout + check.stderr)

    def test_rpc_labels_name_served_methods_only(self):
        # A real method keeps its own labels; any other name a client sends,
        # even under kennel. or grpc., is counted as "unknown" instead of
        # adding a series that would stay in memory forever.
        real = {"registry": ("ListModels", b""), "trainer": ("ListJobs", b""),
                "inference": ("GetModelStatus", b"")}
        for kind, service in self.services.items():
            with kt.channel(service.addr) as ch:
                method, body = real[kind]
                ch.unary_unary(f"/{SERVICES[kind]}/{method}")(body, timeout=10)
                for bogus in (f"/{SERVICES[kind]}/NoSuchMethod",
                              "/kennel.v1.NoSuchService/Get",
                              "/grpc.health.v1.Health/NoSuchMethod"):
                    with self.assertRaises(grpc.RpcError) as caught:
                        ch.unary_unary(bogus)(b"", timeout=10)
                    self.assertEqual(caught.exception.code(),
                                     grpc.StatusCode.UNIMPLEMENTED)
            text = service.scrape()
            self.assertIn(f'grpc_method="{method}",grpc_service="{SERVICES[kind]}"',
                          text)
            leaked = [l for l in text.splitlines() if "NoSuch" in l]
            self.assertEqual(leaked, [], kind)
            self.assertIn('grpc_code="UNIMPLEMENTED",grpc_method="unknown",'
                          'grpc_service="unknown"', text)

    def test_prometheus_scrapes_all_three(self):
        kt.require("prometheus", "install Debian's prometheus package")
        port = kt.free_port()
        workdir = tempfile.mkdtemp(prefix="kennel-prom-", dir=self.tmp)
        targets = [f"127.0.0.1:{s.metrics_port}" for s in self.services.values()]
        config = os.path.join(workdir, "prometheus.yml")
        with open(config, "w") as f:
            json.dump({"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                       "scrape_configs": [{"job_name": "kennel",
                                           "static_configs": [{"targets": targets}]}]}, f)
        log = open(os.path.join(workdir, "prometheus.log"), "w")
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={config}",
             f"--storage.tsdb.path={workdir}/data",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode(
                {"query": "up"})

            def all_up():
                with urllib.request.urlopen(url, timeout=5) as r:
                    result = json.load(r)["data"]["result"]
                up = {x["metric"]["instance"]: x["value"][1] for x in result}
                return all(up.get(t) == "1" for t in targets) and up
            up = kt.wait_until(all_up, timeout=60, interval=0.5,
                               what="Prometheus to scrape every service")
            self.assertEqual(set(up), set(targets))

            # A Kennel series made it through, labelled by service.
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode(
                {"query": "kennel_build_info"})
            with urllib.request.urlopen(url, timeout=5) as r:
                services = {x["metric"]["service"]
                            for x in json.load(r)["data"]["result"]}
            self.assertEqual(services, {f"kennel-{k}" for k in SERVICES})
        finally:
            prom.terminate()
            prom.wait(10)


class ProcessTest(unittest.TestCase):
    def test_sigterm_when_idle_exits_zero(self):
        for kind in ("registry", "trainer"):
            tmp = tempfile.mkdtemp(prefix="kennel-term-")
            s = kt.Service(kind, *server_args(kind, tmp), workdir=tmp, metrics=False)
            s.start()
            self.assertEqual(s.stop(signal.SIGTERM), 0, s.log())
            self.assertIn("stopped", s.log())

    def test_bad_flag_is_refused(self):
        r = subprocess.run([kt.binary("registry"), "--no-such-flag=1"],
                           capture_output=True, text=True, timeout=30)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("no_such_flag", r.stderr)

    def test_missing_token_file_refuses_to_start(self):
        r = subprocess.run([kt.binary("registry"), "--listen=127.0.0.1:0",
                            "--metrics-listen=off", "--token-file=/nonexistent/tok"],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 2)
        self.assertIn("cannot read token file", r.stderr)

    def test_busy_port_is_a_clear_error(self):
        tmp = tempfile.mkdtemp(prefix="kennel-busy-")
        with kt.Service("trainer", *server_args("trainer", tmp), workdir=tmp,
                        metrics=False) as first:
            r = subprocess.run([kt.binary("trainer"), f"--listen={first.addr}",
                                "--metrics-listen=off"] + first.args,
                               capture_output=True, text=True, timeout=30)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("cannot listen", r.stderr)


class TlsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        kt.require("openssl", "install Debian's openssl package")
        cls.tmp = tempfile.mkdtemp(prefix="kennel-tls-")
        cls.cert = os.path.join(cls.tmp, "cert.pem")
        cls.key = os.path.join(cls.tmp, "key.pem")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=localhost", "-addext",
             "subjectAltName=DNS:localhost,IP:127.0.0.1",
             "-keyout", cls.key, "-out", cls.cert],
            check=True, capture_output=True, timeout=60)
        args = [f"--tls-cert={cls.cert}", f"--tls-key={cls.key}"]
        args += server_args("registry", cls.tmp)
        cls.registry = kt.Service("registry", *args, workdir=cls.tmp,
                                  metrics=False).start()

    @classmethod
    def tearDownClass(cls):
        cls.registry.stop()

    def test_log_says_tls(self):
        self.assertIn("(TLS)", self.registry.log())

    def test_plaintext_client_cannot_connect(self):
        stub = health_pb2_grpc.HealthStub(kt.channel(self.registry.addr))
        with self.assertRaises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=3)
        self.assertIn(e.exception.code(), (grpc.StatusCode.UNAVAILABLE,
                                           grpc.StatusCode.DEADLINE_EXCEEDED))
        r = kt.kennel("health", "--timeout=3s", addr=self.registry.addr)
        self.assertEqual(r.returncode, 1)

    def test_tls_client_with_the_ca_connects(self):
        with open(self.cert, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.secure_channel(f"localhost:{self.registry.port}", creds)
        r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=10)
        self.assertEqual(r.status, health_pb2.HealthCheckResponse.SERVING)
        out = kt.kennel("health", f"--tls-ca={self.cert}",
                        addr=f"localhost:{self.registry.port}")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("SERVING", out.stdout)


class CliTest(unittest.TestCase):
    def test_help_lists_commands_and_exits_zero(self):
        r = kt.kennel("--help", check=True)
        self.assertIn("health", r.stdout)
        r = kt.kennel("health", "--help", check=True)
        self.assertIn("Usage: kennel health", r.stdout)

    def test_version(self):
        r = kt.kennel("--version", check=True)
        self.assertRegex(r.stdout, r"^kennel \d+\.\d+")

    def test_unknown_command_is_a_usage_error(self):
        r = kt.kennel("frobnicate")
        self.assertEqual(r.returncode, 2)
        self.assertIn("unknown command", r.stderr)

    def test_flags_without_a_command_are_a_usage_error(self):
        # The flag's value is not a command name: "--addr HOST:PORT" alone
        # must be refused, not taken as the command "HOST:PORT" and then lost.
        for args in (["--addr", "127.0.0.1:1"], ["--timeout", "5s", "--json"]):
            r = kt.kennel(*args)
            self.assertEqual(r.returncode, 2, args)
            self.assertIn("no command", r.stderr)

    def test_bad_flags_are_usage_errors(self):
        # Exit status 2, as the help promises, not the flag parser's 1.
        cases = [
            (["health", "--bogus"], "unknown flag --bogus"),
            (["health", "--timeout", "soon"], "--timeout"),
            (["health", "--timeout=0s"], "--timeout must be positive"),
            (["health", "--timeout", "-5s"], "--timeout must be positive"),
            (["health", "--json=maybe"], "--json"),
            (["health", "--addr"], "--addr needs a value"),
        ]
        for args, message in cases:
            r = kt.kennel(*args)
            self.assertEqual(r.returncode, 2, (args, r.stderr))
            self.assertIn(message, r.stderr, args)
        # Values that start with '-' and --noFLAG are not taken for unknown flags.
        r = kt.kennel("health", "--nojson", "--timeout=2s", addr=f"127.0.0.1:{kt.free_port()}")
        self.assertEqual(r.returncode, 1, r.stderr)

    def test_unreachable_service_fails_with_the_grpc_status(self):
        r = kt.kennel("health", "--timeout=2s", addr=f"127.0.0.1:{kt.free_port()}")
        self.assertEqual(r.returncode, 1)
        self.assertRegex(r.stderr, "UNAVAILABLE|DEADLINE_EXCEEDED")


if __name__ == "__main__":
    kt.main()
