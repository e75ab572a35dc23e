"""The container image recipes (deploy/Dockerfile, Dockerfile.trainer-cuda).

No container engine runs on the build machine, so the images themselves are
not built here. What can be checked is: the build stage installs the build
packages scripts/setup.sh installs and copies every folder CMake reads; each
runtime stage runs its binary as a non-root user with no HEALTHCHECK,
labels and ports that agree with the binaries; and deploy/runtime-packages.sh,
which decides what a runtime image installs, resolves every shared library
of the binaries built here to a Debian runtime package.
"""

import os
import re
import subprocess
import tempfile
import unittest

import deploy_testlib as dt
import kennel_testlib as kt

DOCKERFILE = os.path.join(dt.DEPLOY_DIR, "Dockerfile")
CUDA_DOCKERFILE = os.path.join(dt.DEPLOY_DIR, "Dockerfile.trainer-cuda")
RUNTIME_PACKAGES = os.path.join(dt.DEPLOY_DIR, "runtime-packages.sh")
BINARIES = {"registry": "kennel-registry", "trainer": "kennel-trainer",
            "inference": "kennel-inference", "cli": "kennel"}


def read(path):
    with open(path) as f:
        return f.read()


def instructions(text):
    """[(KEYWORD, arguments)] with continuation lines joined and comments
    dropped."""
    out = []
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    for line in joined.splitlines():
        line = line.strip()
        if line:
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def stages(text):
    """{stage name: [(KEYWORD, arguments)]}, plus the FROM line's image."""
    result = {}
    current = None
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)(?: AS (\S+))?", rest)
            current = m.group(2) or f"stage{len(result)}"
            result[current] = [("FROM", m.group(1))]
        elif current:
            result[current].append((keyword, rest))
    return result


def global_args(text):
    args = {}
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, value = rest.partition("=")
            args[name] = value
    return args


def apt_packages(run_arguments):
    m = re.search(r"apt-get install -y --no-install-recommends (.*?)(?:&&|$)", run_arguments)
    return set(m.group(1).split()) if m else set()


def setup_build_packages():
    """The packages of scripts/setup.sh's build section (from the `# build`
    comment to the next comment)."""
    text = read(os.path.join(dt.SOURCE_DIR, "scripts", "setup.sh"))
    block = re.search(r"packages=\((.*?)\n\)", text, re.S).group(1)
    m = re.search(r"#\s*build\b[^\n]*\n(.*?)\n\s*#", block, re.S)
    assert m, "scripts/setup.sh has no `# build` group in packages=( )"
    packages = set()
    for line in m.group(1).splitlines():
        packages |= set(line.split("#")[0].split())
    packages.add("libopenblas0-openmp")  # its own group in setup.sh, needed at run time
    return packages


class Dockerfile(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.text = read(DOCKERFILE)
        cls.stages = stages(cls.text)
        cls.args = global_args(cls.text)

    def stage(self, name):
        self.assertIn(name, self.stages)
        return self.stages[name]

    def test_debian_12(self):
        self.assertEqual(self.args["BUILD_IMAGE"], "debian:12")
        self.assertEqual(self.args["RUNTIME_IMAGE"], "debian:12-slim")
        self.assertEqual(self.stage("build")[0], ("FROM", "${BUILD_IMAGE}"))
        self.assertEqual(self.stage("runtime")[0], ("FROM", "${RUNTIME_IMAGE}"))

    def test_build_stage_installs_setup_packages(self):
        installed = set()
        for keyword, rest in self.stage("build"):
            if keyword == "RUN":
                installed |= apt_packages(rest)
        missing = setup_build_packages() - installed
        self.assertFalse(missing, f"the build stage lacks setup.sh's {sorted(missing)}")

    def test_build_stage_copies_what_cmake_reads(self):
        top = read(os.path.join(dt.SOURCE_DIR, "CMakeLists.txt"))
        copied = {rest.split()[0] for keyword, rest in self.stage("build") if keyword == "COPY"}
        for directory in re.findall(r"^add_subdirectory\((\w+)\)", top, re.M):
            self.assertIn(directory, copied, f"CMakeLists.txt adds {directory}/")
        self.assertIn("CMakeLists.txt", copied)

    def test_version_label_matches_project(self):
        top = read(os.path.join(dt.SOURCE_DIR, "CMakeLists.txt"))
        version = re.search(r"project\(kennel VERSION ([0-9.]+)", top).group(1)
        self.assertEqual(self.args["KENNEL_VERSION"], version)

    def test_no_healthcheck(self):
        self.assertNotIn("HEALTHCHECK", [k for k, _ in instructions(self.text)])
        self.assertNotIn("HEALTHCHECK", [k for k, _ in instructions(read(CUDA_DOCKERFILE))])

    def test_runtime_stages(self):
        defaults = dt.default_ports()
        for name, binary in BINARIES.items():
            stage = dict()
            for keyword, rest in self.stage(name):
                stage.setdefault(keyword, []).append(rest)
            self.assertEqual(stage["FROM"], ["runtime"], name)
            self.assertEqual(stage["USER"], ["10001:10001"], name)
            self.assertEqual(stage["ENTRYPOINT"], [f'["/usr/local/bin/{binary}"]'], name)
            self.assertIn(f"--from=build /out/{binary} /usr/local/bin/{binary}", stage["COPY"])
            self.assertIn(f"--from=build /out/{binary}.packages /tmp/packages", stage["COPY"])
            self.assertTrue(any("xargs -a /tmp/packages apt-get install" in r for r in stage["RUN"]))
            labels = " ".join(stage["LABEL"])
            for key in ("title", "version", "revision", "source", "description"):
                self.assertIn(f"org.opencontainers.image.{key}=", labels, name)
            self.assertIn('org.opencontainers.image.version="${KENNEL_VERSION}"', labels)
            self.assertIn("KENNEL_VERSION", stage["ARG"])
            if name in dt.SERVICES:
                grpc_port, metrics_port = defaults[name]
                self.assertEqual(stage["EXPOSE"], [f"{grpc_port} {metrics_port}"], name)
                self.assertEqual(stage["CMD"], [f'["--listen=0.0.0.0:{grpc_port}", '
                                                f'"--metrics-listen=0.0.0.0:{metrics_port}"]'])
        runtime = " ".join(rest for _, rest in self.stage("runtime"))
        self.assertIn("--uid 10001", runtime)
        self.assertIn("/var/lib/kennel /var/cache/kennel", runtime)

    def test_runtime_package_lists_come_from_the_binaries(self):
        build = " ".join(rest for keyword, rest in self.stage("build") if keyword == "RUN")
        for name, binary in BINARIES.items():
            folder = "cli" if name == "cli" else name
            self.assertIn(f"/build/services/{folder}/{binary}", build)
        self.assertIn("for b in registry trainer inference;", build)
        self.assertIn("deploy/runtime-packages.sh /out/kennel-$b >/out/kennel-$b.packages", build)
        self.assertIn("deploy/runtime-packages.sh /out/kennel >/out/kennel.packages", build)


class CudaDockerfile(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.text = read(CUDA_DOCKERFILE)
        cls.stages = stages(cls.text)

    def test_libtorch_archive_is_a_verified_build_argument(self):
        build = dict()
        for keyword, rest in self.stages["build"]:
            build.setdefault(keyword, []).append(rest)
        self.assertIn("LIBTORCH_URL", build["ARG"])
        self.assertIn("LIBTORCH_SHA256", build["ARG"])
        run = " ".join(build["RUN"])
        self.assertIn('sha256sum -c -', run)
        self.assertIn("-DCMAKE_PREFIX_PATH=/opt/libtorch", run)
        self.assertIn("--target kennel-trainer", run)
        # The header says how to call it and that it is not built here.
        self.assertIn("--build-arg LIBTORCH_URL=", self.text)
        self.assertIn("never been built", self.text)

    def test_same_packages_but_libtorch(self):
        installed = set()
        for keyword, rest in self.stages["build"]:
            if keyword == "RUN":
                installed |= apt_packages(rest)
        want = setup_build_packages() - {"libtorch-dev", "libopenblas0-openmp"}
        self.assertFalse(want - installed, sorted(want - installed))
        self.assertNotIn("libtorch-dev", installed)
        self.assertIn("nvidia-cuda-toolkit", installed)

    def test_runtime(self):
        stage = dict()
        for keyword, rest in self.stages["trainer"]:
            stage.setdefault(keyword, []).append(rest)
        self.assertEqual(stage["USER"], ["10001:10001"])
        self.assertEqual(stage["ENTRYPOINT"], ['["/usr/local/bin/kennel-trainer"]'])
        self.assertIn("--from=build /opt/libtorch/lib /opt/libtorch/lib", stage["COPY"])
        grpc_port, metrics_port = dt.default_ports()["trainer"]
        self.assertEqual(stage["EXPOSE"], [f"{grpc_port} {metrics_port}"])
        self.assertIn("--device=cuda", stage["CMD"][0])
        self.assertIn("device", dt.binary_flags("trainer"))


class RuntimePackages(unittest.TestCase):
    def run_script(self, *args):
        return subprocess.run([RUNTIME_PACKAGES, *args], capture_output=True, text=True,
                              timeout=120)

    def test_every_library_of_every_binary_has_a_package(self):
        for name, binary in BINARIES.items():
            path = kt.binary(name if name != "cli" else "kennel")
            r = self.run_script(path)
            self.assertEqual(r.returncode, 0, f"{binary}: {r.stderr}")
            packages = r.stdout.split()
            self.assertEqual(packages, sorted(set(packages)))
            self.assertIn("libc6", packages)
            self.assertIn("libgrpc++1.51", packages)
            self.assertFalse([p for p in packages if p.endswith("-dev")], packages)
            # Each package really is installed here, so apt can find it.
            q = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Status}\n", *packages],
                               capture_output=True, text=True)
            installed = {line.split()[0] for line in q.stdout.splitlines()
                         if line.endswith("install ok installed")}
            self.assertEqual(set(packages) - installed, set(), binary)
            # A binary that loads LibTorch gets Debian's LibTorch and OpenBLAS.
            ldd = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
            if "libtorch" in ldd:
                self.assertTrue([p for p in packages if p.startswith("libtorch")], binary)
                self.assertIn("libopenblas0-openmp", packages, binary)
            else:
                self.assertFalse([p for p in packages if p.startswith("libtorch")], binary)

    def test_registry_image_has_no_libtorch(self):
        r = self.run_script(kt.binary("registry"))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertFalse([p for p in r.stdout.split() if "torch" in p or "opencv" in p],
                         r.stdout)

    def test_failures(self):
        r = self.run_script("/nonexistent/kennel-registry")
        self.assertEqual(r.returncode, 1)
        self.assertIn("does not exist", r.stderr)
        r = self.run_script()
        self.assertEqual(r.returncode, 2)
        # A library that no package owns (a copy outside dpkg's knowledge).
        with tempfile.TemporaryDirectory() as tmp:
            lib = os.path.join(tmp, "libz.so.1")
            with open("/lib/x86_64-linux-gnu/libz.so.1", "rb") as src, open(lib, "wb") as dst:
                dst.write(src.read())
            r = self.run_script(lib)
            self.assertEqual(r.returncode, 0, r.stderr)  # its own dependencies are packaged
            env = dict(os.environ, LD_LIBRARY_PATH=tmp)
            r = subprocess.run([RUNTIME_PACKAGES, kt.binary("registry")], capture_output=True,
                               text=True, env=env, timeout=120)
            self.assertEqual(r.returncode, 1, r.stdout)
            self.assertIn(f"no Debian package owns {lib}", r.stderr)
            r = subprocess.run([RUNTIME_PACKAGES, "--skip-prefix", tmp, kt.binary("registry")],
                               capture_output=True, text=True, env=env, timeout=120)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertNotIn("zlib1g", r.stdout.split())


if __name__ == "__main__":
    unittest.main(verbosity=2)
