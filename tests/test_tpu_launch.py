"""scripts/tpu_vm_launch.sh --dry-run prints the gcloud commands it would run on every worker."""

import os
import subprocess

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "tpu_vm_launch.sh")


def launch(*args):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True)


def test_train_runs_on_all_workers_and_streams_worker_0():
    r = launch("train", "--name", "pod", "--zone", "us-central2-b", "--config", "configs/train_example.yaml",
               "--dry-run", "--", "steps=10")
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.strip().splitlines()
    assert first.startswith("gcloud compute tpus tpu-vm ssh pod --zone us-central2-b --worker=all --command")
    assert "clp-jax\\ train\\ --config\\ configs/train_example.yaml\\ distributed.mode=on\\ steps=10" in first
    assert "--worker=0" in second and "train.log" in second


def test_create_and_errors():
    r = launch("create", "--name", "pod", "--zone", "z", "--type", "v4-32", "--dry-run")
    assert r.stdout.startswith("gcloud compute tpus tpu-vm create pod --zone z --accelerator-type v4-32")
    assert launch("train", "--name", "pod", "--zone", "z", "--dry-run").returncode == 2  # no --config
    assert launch("create", "--zone", "z").returncode == 2
    assert launch("bogus", "--name", "a", "--zone", "b").returncode == 2
