"""Jobs outlive their clients and the trainer process, on the real binaries.

What is checked: a client that disconnects mid-job does not stop it, and
`kennel jobs watch` replays what it missed and sees the job finish with its
model registered; CancelJob stops a running job at a step boundary and a
queued one at once; jobs beyond --max-concurrent-jobs queue; history
survives a restart, and a job that was running when the trainer was killed
shows as FAILED with a message saying so."""

import json
import tempfile
import unittest

import kennel_testlib as kt
import trainer_fixtures as tf

import grpc
from kennel.v1 import trainer_pb2


def slow_request(**kw):
    """A fine-tune job that takes a few seconds on two cores."""
    args = dict(mode="finetune", lr=0.003, batch_size=16, epochs=8)
    args.update(kw)
    return tf.train_request(**args)


class TrainerJobsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="kennel-trainer-jobs-")
        cls.root = tf.make_root(cls.tmp, per_class=10)
        cls.registry, cls.trainer = tf.start_servers(cls.tmp, cls.root)

    @classmethod
    def tearDownClass(cls):
        cls.trainer.stop()
        cls.registry.stop()

    def stub(self):
        return tf.trainer_stub(self.trainer)

    def get(self, job_id):
        return self.stub().GetJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=10)

    def wait_for_end(self, job_id, timeout=120):
        ended = (trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED,
                 trainer_pb2.JOB_STATE_CANCELLED)
        kt.wait_until(lambda: self.get(job_id).state in ended, timeout=timeout,
                      what=f"job {job_id} to end")
        return self.get(job_id)

    def start_and_leave(self, request, until="epoch"):
        """Starts a job, reads until the first event of kind `until`, then
        closes the connection. Returns (job id, last sequence seen)."""
        channel = kt.channel(self.trainer.addr)
        stub = tf.trainer_pb2_grpc.TrainerStub(channel)
        call = stub.Train(request, timeout=300)
        job_id, last = None, 0
        for event in call:
            job_id = event.job_id
            last = event.sequence
            if event.WhichOneof("event") == until:
                break
        call.cancel()
        channel.close()
        return job_id, last

    def test_disconnect_then_watch_sees_the_job_finish(self):
        job_id, seen = self.start_and_leave(slow_request(register_as="left-behind"))
        self.assertTrue(job_id)
        # The job goes on without its client.
        self.assertEqual(self.get(job_id).state, trainer_pb2.JOB_STATE_RUNNING)
        watch = kt.kennel("jobs", "watch", job_id, addr=self.trainer.addr, timeout=300)
        self.assertEqual(watch.returncode, 0, watch.stdout + watch.stderr)
        # Everything from the start is replayed, then followed live.
        self.assertIn(f"job {job_id} accepted", watch.stdout)
        self.assertRegex(watch.stdout, r"epoch  8/8")
        self.assertIn("registered left-behind:1", watch.stdout)
        job = self.get(job_id)
        self.assertEqual(job.state, trainer_pb2.JOB_STATE_SUCCEEDED)
        self.assertEqual(job.model_ref, "left-behind:1")
        # Re-attaching after a sequence number replays only what followed.
        rest = kt.kennel("jobs", "watch", job_id, "--after", seen, "--json",
                         addr=self.trainer.addr, check=True)
        sequences = [json.loads(line)["sequence"] for line in rest.stdout.splitlines()]
        self.assertEqual(int(sequences[0]), seen + 1)

    def test_cancel_stops_a_running_job(self):
        job_id, _ = self.start_and_leave(slow_request(epochs=50))
        cancelled = kt.kennel("jobs", "cancel", job_id, addr=self.trainer.addr, check=True)
        self.assertIn(job_id, cancelled.stdout)
        job = self.wait_for_end(job_id, timeout=60)
        self.assertEqual(job.state, trainer_pb2.JOB_STATE_CANCELLED)
        events = list(self.stub().WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id),
                                           timeout=30))
        self.assertTrue(events[-1].HasField("cancelled"))
        epochs = [e for e in events if e.HasField("epoch")]
        self.assertLess(len(epochs), 50)
        self.assertEqual(job.model_ref, "")
        # Cancelling it again says there was nothing left to cancel.
        again = kt.kennel("jobs", "cancel", job_id, addr=self.trainer.addr, check=True)
        self.assertIn("nothing was cancelled", again.stdout)

    def test_jobs_beyond_the_limit_queue(self):
        first, _ = self.start_and_leave(slow_request(epochs=6), until="started")
        second, _ = self.start_and_leave(tf.train_request(epochs=2), until="log")
        self.assertEqual(self.get(second).state, trainer_pb2.JOB_STATE_QUEUED)
        events = list(self.stub().WatchJob(trainer_pb2.WatchJobRequest(job_id=second),
                                           timeout=120))
        self.assertIn("queued behind 1 job", events[0].log)
        self.assertTrue(events[-1].HasField("completed"))
        self.assertEqual(self.get(first).state, trainer_pb2.JOB_STATE_SUCCEEDED)
        # The queued job started only after the first had ended.
        self.assertGreaterEqual(
            self.get(second).started_at.ToNanoseconds(),
            self.get(first).finished_at.ToNanoseconds())

    def test_watch_unknown_job_is_not_found(self):
        code, _ = tf.code_of(self.stub().WatchJob(
            trainer_pb2.WatchJobRequest(job_id="job-nope"), timeout=10))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
        shown = kt.kennel("jobs", "show", "job-nope", addr=self.trainer.addr)
        self.assertEqual(shown.returncode, 1)
        self.assertIn("NOT_FOUND", shown.stderr)


class TrainerRestartTest(unittest.TestCase):
    def test_history_survives_and_killed_job_shows_failed(self):
        tmp = tempfile.mkdtemp(prefix="kennel-trainer-restart-")
        root = tf.make_root(tmp, per_class=5)
        _, trainer = tf.start_servers(tmp, root, registry=False)
        try:
            stub = tf.trainer_stub(trainer)
            done = tf.train(stub, tf.train_request(epochs=2))
            self.assertTrue(done[-1].HasField("completed"))
            done_id = done[0].job_id
            call = stub.Train(slow_request(epochs=200), timeout=300)
            running_id = None
            for event in call:
                running_id = event.job_id
                if event.HasField("epoch"):
                    break
            trainer.kill()  # as a crash would: no drain, no goodbye
            call.cancel()
            trainer.start(timeout=60)
            stub = tf.trainer_stub(trainer)
            jobs = {j.id: j for j in stub.ListJobs(trainer_pb2.ListJobsRequest(),
                                                   timeout=10).jobs}
            self.assertIn(done_id, jobs)
            self.assertEqual(jobs[done_id].state, trainer_pb2.JOB_STATE_SUCCEEDED)
            crashed = jobs[running_id]
            self.assertEqual(crashed.state, trainer_pb2.JOB_STATE_FAILED)
            self.assertIn("stopped while this job was running", crashed.message)
            events = list(stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=running_id),
                                        timeout=30))
            self.assertTrue(any(e.HasField("epoch") for e in events))
            self.assertTrue(events[-1].HasField("failed"))
            self.assertEqual([e.sequence for e in events], list(range(1, len(events) + 1)))
            listed = kt.kennel("jobs", "ls", addr=trainer.addr, check=True).stdout
            self.assertIn(running_id, listed)
            self.assertIn("failed", listed)
        finally:
            trainer.stop()


if __name__ == "__main__":
    kt.main()
