"""The registry's S3 suite against s3rver (npm, pinned in tests/), which
checks no signature and ignores conditional writes: the registry must say
so at start-up and still hand out distinct versions by serialising them
itself."""

import unittest

import kennel_testlib as kt
import test_registry_s3_suite as suite


class S3rverRegistryTest(suite.S3RegistryTests, unittest.TestCase):
    server_class = suite.S3rver


if __name__ == "__main__":
    kt.main()
