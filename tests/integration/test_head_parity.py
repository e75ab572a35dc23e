"""Parity: Kennel's head training against a short reference loop in Python
PyTorch on the same cached features, the same initial weights and the same
batch order.

The trainer runs a real head job (filling its feature cache); then
kennel-head-trace reads the features back through that cache (every one a
hit), with the seeded initial weights and the batch order Kennel used; a
plain torch.optim.Adam loop replays them. The final losses agree within
1e-4 relative, with each other and with what the trainer's job reported."""

import json
import os
import subprocess
import tempfile
import unittest

import numpy as np
import torch

import kennel_testlib as kt
import trainer_fixtures as tf

LR, WEIGHT_DECAY, BATCH, EPOCHS, SEED = 0.01, 1e-4, 16, 4, 7


def load(path, dtype, shape):
    return torch.from_numpy(np.fromfile(path, dtype=dtype).reshape(shape).copy())


def reference_loop(trace_dir, info):
    n, f, c = info["train_size"], info["feature_dim"], info["num_classes"]
    x = load(os.path.join(trace_dir, "train_features.f32"), np.float32, (n, f))
    y = load(os.path.join(trace_dir, "train_labels.i64"), np.int64, (n,))
    vx = load(os.path.join(trace_dir, "valid_features.f32"), np.float32,
              (info["valid_size"], f))
    vy = load(os.path.join(trace_dir, "valid_labels.i64"), np.int64, (info["valid_size"],))
    orders = load(os.path.join(trace_dir, "orders.i64"), np.int64, (info["epochs"], n))
    head = torch.nn.Linear(f, c)
    with torch.no_grad():
        head.weight.copy_(load(os.path.join(trace_dir, "init_weight.f32"), np.float32, (c, f)))
        head.bias.copy_(load(os.path.join(trace_dir, "init_bias.f32"), np.float32, (c,)))
    opt = torch.optim.Adam(head.parameters(), lr=info["learning_rate"],
                           weight_decay=info["weight_decay"])
    steps, epoch_losses, valid_losses = [], [], []
    for epoch in range(info["epochs"]):
        total = 0.0
        for start in range(0, n, info["batch_size"]):
            rows = orders[epoch, start:start + info["batch_size"]]
            loss = torch.nn.functional.cross_entropy(head(x[rows]), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps.append(loss.item())
            total += loss.item() * len(rows)
        epoch_losses.append(total / n)
        with torch.no_grad():
            valid_losses.append(torch.nn.functional.cross_entropy(head(vx), vy).item())
    return steps, epoch_losses, valid_losses, head


class HeadParityTest(unittest.TestCase):
    def test_kennel_head_training_matches_pytorch(self):
        tmp = tempfile.mkdtemp(prefix="kennel-parity-")
        root = tf.make_root(tmp, per_class=12)
        _, trainer = tf.start_servers(tmp, root, registry=False)
        try:
            request = tf.train_request(lr=LR, batch_size=BATCH, epochs=EPOCHS, seed=SEED)
            request.hyperparameters.weight_decay = WEIGHT_DECAY
            events = tf.train(tf.trainer_stub(trainer), request)
            self.assertTrue(events[-1].HasField("completed"), events[-1])
            precision = next(e.started.precision for e in events if e.HasField("started"))
            job_epochs = [e.epoch for e in events if e.HasField("epoch")]
        finally:
            trainer.stop()

        trace = os.path.join(tmp, "trace")
        precision_name = {1: "fp32", 2: "bf16"}[precision]
        result = subprocess.run(
            [kt.binary("services/trainer/kennel-head-trace"), f"--data-root={root}",
             "--data=fm", "--backbone=small_cnn.pt", f"--cache-dir={tmp}/cache",
             f"--precision={precision_name}", f"--lr={LR}", f"--weight-decay={WEIGHT_DECAY}",
             f"--batch-size={BATCH}", f"--epochs={EPOCHS}", f"--seed={SEED}",
             f"--out={trace}"], capture_output=True, text=True, timeout=300)
        self.assertEqual(result.returncode, 0, result.stderr)
        with open(os.path.join(trace, "result.json")) as f:
            info = json.load(f)
        # The same cached features the job trained on: nothing recomputed.
        self.assertEqual(info["cache_misses"], 0)
        self.assertEqual(info["cache_hits"], 3 * 120)

        steps, epoch_losses, valid_losses, head = reference_loop(trace, info)

        def close(a, b, rel=1e-4):
            return abs(a - b) <= rel * max(abs(a), abs(b))

        self.assertEqual(len(steps), len(info["step_losses"]))
        for i, (ours, theirs) in enumerate(zip(info["step_losses"], steps)):
            self.assertTrue(close(ours, theirs), f"step {i}: kennel {ours} torch {theirs}")
        final_kennel = job_epochs[-1]
        self.assertTrue(close(final_kennel.train_loss, epoch_losses[-1]),
                        (final_kennel.train_loss, epoch_losses[-1]))
        self.assertTrue(close(final_kennel.valid_loss, valid_losses[-1]),
                        (final_kennel.valid_loss, valid_losses[-1]))
        # The tool replays the job exactly.
        self.assertEqual(info["epoch_train_loss"][-1], final_kennel.train_loss)
        f, c = info["feature_dim"], info["num_classes"]
        final_w = load(os.path.join(trace, "final_weight.f32"), np.float32, (c, f))
        self.assertTrue(torch.allclose(final_w, head.weight.detach(), rtol=1e-4, atol=1e-6))
        print(f"parity: final train loss kennel {final_kennel.train_loss:.8f} "
              f"torch {epoch_losses[-1]:.8f}; valid kennel {final_kennel.valid_loss:.8f} "
              f"torch {valid_losses[-1]:.8f} ({precision_name} features)")


if __name__ == "__main__":
    kt.main()
