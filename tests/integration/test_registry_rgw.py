"""The registry on a real S3 server: a throwaway single-node Ceph radosgw,
which checks SigV4 signatures and honours If-None-Match: *, so version
allocation is tested against a store that enforces it. The ObjectStore
contract tests also run against it here."""

import os
import re
import subprocess
import unittest

import kennel_testlib as kt
import test_registry_s3_suite as suite


class RadosGatewayRegistryTest(suite.S3RegistryTests, unittest.TestCase):
    server_class = suite.RadosGateway

    def test_object_store_contract_holds_on_radosgw(self):
        binary = os.path.join(kt.BUILD_DIR, "common", "storage", "object_store_test")
        if not os.access(binary, os.X_OK):
            self.skipTest("object_store_test is not built")
        env = dict(os.environ, **self.s3.env(), S3_ENDPOINT=self.s3.endpoint,
                   KENNEL_TEST_S3_URL=f"s3://{suite.BUCKET}/contract")
        result = subprocess.run([binary, "--gtest_filter=Backends/ObjectStoreTest.*/2"],
                                capture_output=True, text=True, env=env, timeout=300)
        self.assertEqual(result.returncode, 0, result.stdout[-4000:] + result.stderr[-2000:])
        self.assertNotIn("SKIPPED", result.stdout)
        ran = re.search(r"Running (\d+) tests", result.stdout)
        self.assertIsNotNone(ran, result.stdout[-2000:])
        self.assertGreaterEqual(int(ran.group(1)), 10)
        self.assertIn(f"[  PASSED  ] {ran.group(1)} tests", result.stdout)


if __name__ == "__main__":
    kt.main()
