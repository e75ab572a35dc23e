"""Runs the image_fuzz target: first every seed (real and truncated images,
lying headers) once, as regular test cases, then libFuzzer for a bounded
time (KENNEL_FUZZ_SECONDS, default 30) starting from those seeds. Skips
(77) where clang's libFuzzer was not available to build the target."""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

BUILD_DIR = os.environ.get("KENNEL_BUILD_DIR", "build")
HERE = os.path.dirname(os.path.abspath(__file__))
FUZZER = os.path.join(BUILD_DIR, "tests", "fuzz", "image_fuzz")
SECONDS = int(os.environ.get("KENNEL_FUZZ_SECONDS", "30"))


class ImageFuzzTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="kennel-fuzz-")
        cls.seeds = os.path.join(cls.tmp, "seeds")
        subprocess.run(["/usr/bin/python3", os.path.join(HERE, "make_corpus.py"),
                        cls.seeds], check=True, timeout=120, capture_output=True)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def run_fuzzer(self, *args, timeout):
        result = subprocess.run([FUZZER, f"-artifact_prefix={self.tmp}/", *args],
                                capture_output=True, text=True, timeout=timeout,
                                cwd=self.tmp)
        crashes = glob.glob(os.path.join(self.tmp, "crash-*")) + glob.glob(
            os.path.join(self.tmp, "timeout-*")) + glob.glob(os.path.join(self.tmp, "oom-*"))
        self.assertEqual(result.returncode, 0,
                         f"{crashes}\n{result.stderr[-6000:]}")
        self.assertEqual(crashes, [])
        return result

    def test_every_seed_runs_clean(self):
        files = sorted(glob.glob(os.path.join(self.seeds, "*")))
        self.assertGreater(len(files), 50)
        result = self.run_fuzzer(*files, timeout=120)
        self.assertIn(f"Executed {files[-1]}", result.stderr)

    def test_bounded_fuzzing_finds_nothing(self):
        work = os.path.join(self.tmp, "work")
        os.makedirs(work)
        result = self.run_fuzzer(work, self.seeds, f"-max_total_time={SECONDS}",
                                 "-timeout=10", "-rss_limit_mb=2048",
                                 "-max_len=131072", "-print_final_stats=1",
                                 timeout=SECONDS + 120)
        self.assertIn("stat::number_of_executed_units", result.stderr)


if __name__ == "__main__":
    if not os.access(FUZZER, os.X_OK):
        print(f"SKIP: {FUZZER} is not built (needs clang and libclang-rt-14-dev)",
              file=sys.stderr)
        sys.exit(77)
    unittest.main(verbosity=2)
