"""Data sets and backbones from S3, on a real S3 server (a throwaway Ceph
radosgw, which checks SigV4 signatures) with the real trainer.

What is checked: a job on s3://bucket/prefix with an s3:// backbone runs,
downloading the images once into the cache (a second job downloads
nothing); the layout is validated from the listing before any job exists
(mismatched classes, a missing prefix, a missing backbone are
INVALID_ARGUMENT)."""

import os
import tempfile
import unittest

import kennel_testlib as kt
import test_registry_s3_suite as suite
import trainer_fixtures as tf

import grpc


class TrainerS3Test(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="kennel-trainer-s3-")
        cls.s3 = suite.RadosGateway(cls.tmp)
        cls.s3.start()
        root = tf.make_root(cls.tmp, per_class=5)
        client = cls.s3.boto3()
        for dirpath, _, files in os.walk(os.path.join(root, "fm")):
            for name in files:
                path = os.path.join(dirpath, name)
                key = "data/fm/" + os.path.relpath(path, os.path.join(root, "fm"))
                client.upload_file(path, suite.BUCKET, key)
                if "valid/009.Ankle_boot" not in key:
                    client.upload_file(path, suite.BUCKET,
                                       key.replace("data/fm/", "data/odd/"))
        client.upload_file(os.path.join(root, "small_cnn.pt"), suite.BUCKET, "models/cnn.pt")
        client.upload_file(os.path.join(root, "small_cnn.pt.json"), suite.BUCKET,
                           "models/cnn.pt.json")
        cls.trainer = kt.Service("trainer", f"--cache-dir={cls.tmp}/cache",
                                 f"--jobs-dir={cls.tmp}/jobs", "--threads=2",
                                 f"--s3-endpoint={cls.s3.endpoint}", "--s3-path-style",
                                 workdir=cls.tmp, env=cls.s3.env()).start(timeout=60)
        cls.stub = tf.trainer_stub(cls.trainer)

    @classmethod
    def tearDownClass(cls):
        cls.trainer.stop()
        cls.s3.stop()

    def test_job_on_s3_data_downloads_once(self):
        request = tf.train_request(data=f"s3://{suite.BUCKET}/data/fm",
                                   backbone=f"s3://{suite.BUCKET}/models/cnn.pt", epochs=2)
        first = tf.train(self.stub, request)
        self.assertTrue(first[-1].HasField("completed"), first[-1])
        downloads = [e.progress for e in first
                     if e.HasField("progress") and e.progress.phase == "download"]
        self.assertTrue(downloads)
        self.assertEqual(downloads[-1].done, 150)
        self.assertEqual(downloads[-1].total, 150)
        started = next(e.started for e in first if e.HasField("started"))
        self.assertEqual(len(started.classes), 10)

        second = tf.train(self.stub, request)
        self.assertTrue(second[-1].HasField("completed"))
        self.assertFalse([e for e in second
                          if e.HasField("progress") and e.progress.phase == "download"])

    def test_bad_s3_locations_are_invalid_argument(self):
        backbone = f"s3://{suite.BUCKET}/models/cnn.pt"
        cases = {
            "mismatched classes": tf.train_request(data=f"s3://{suite.BUCKET}/data/odd",
                                                   backbone=backbone),
            "empty prefix": tf.train_request(data=f"s3://{suite.BUCKET}/data/none",
                                             backbone=backbone),
            "missing backbone": tf.train_request(data=f"s3://{suite.BUCKET}/data/fm",
                                                 backbone=f"s3://{suite.BUCKET}/models/no.pt"),
        }
        for what, request in cases.items():
            code, details = tf.code_of(self.stub.Train(request, timeout=60))
            self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {details}")
        code, details = tf.code_of(self.stub.Train(cases["mismatched classes"], timeout=60))
        self.assertIn("009.Ankle_boot", details)


if __name__ == "__main__":
    kt.main()
