"""`ray job submit` end to end on a real Ray cluster on this machine (see local_ray.py): the
demo job on two nodes with its shards and checkpoints in S3 and this checkout as its working
dir, as on AWS (docs/cluster.md; its "Rehearse on your machine" is the same job on one node,
with less to check). The job shrinks the demo model and trains a few steps: about a minute
on 2 cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from local_ray import DASHBOARD, VENV_BIN, LoopbackCluster, loopback_cluster

from ulm_dist.train.metrics_log import METRICS_NAME

pytestmark = pytest.mark.slow

STEPS = 4
# The demo job, smaller: the tiny model of tests/conftest.py, 4 steps of 8 pairs, 2 workers.
QUICK = [
    "train.num_workers=2",
    "train.warmup_steps=1",
    f"train.steps={STEPS}",
    "train.log_every=2",
    "train.checkpoint_every=2",
]
JOB_TIMEOUT_S = 400


def submit(
    cluster: LoopbackCluster, job_id: str, options: list[str], overrides: list[str]
) -> tuple[dict, str]:
    """`ray job submit ... -- python -m ulm_dist.train --config jobs/demo.yaml ...`, which
    follows the job's output until it ends; returns the job's record (`ray list jobs`) and
    that output, once the job has SUCCEEDED."""
    output = cluster.run(
        [
            "ray",
            "job",
            "submit",
            f"--address={DASHBOARD}",
            f"--submission-id={job_id}",
            *options,
            "--",
            "python",
            "-m",
            "ulm_dist.train",
            "--config",
            "jobs/demo.yaml",
            *QUICK,
            *overrides,
        ],
        timeout=JOB_TIMEOUT_S,
    )
    (job,) = cluster.state("jobs", f"submission_id={job_id}")
    assert job["status"] == "SUCCEEDED", f"job {job_id}: {job}\n--- its output:\n{output}"
    return job, output


def test_demo_job_spreads_over_two_nodes_with_shards_and_checkpoints_in_s3(
    tmp_path: Path, tiny_model_overrides: list[str]
):
    bucket, endpoint = "s3://ulm-cluster-test", "http://127.0.0.1:5000"
    # Dummy credentials that the local S3 server accepts; every Ray process inherits them.
    credentials = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    logs = tmp_path / "logs"
    with loopback_cluster(keep_logs=tmp_path / "cluster", extra_env=credentials) as cluster:
        # The bucket: an S3 server inside the cluster's network namespace.
        cluster.start_background(
            [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", "5000"], "moto_server.log"
        )
        run_python(cluster, WAIT_AND_CREATE_BUCKET.format(endpoint=endpoint, bucket=bucket[5:]))
        # As docs/cluster.md does: shards built straight into the bucket.
        cluster.run(
            [
                "python",
                "-m",
                "ulm_dist.data",
                "synth",
                f"{bucket}/synthetic",
                "--n=32",
                "--size=16",
                "--samples-per-shard=16",
                "--workers=1",
                "--no-progress",
                f"--endpoint-url={endpoint}",
            ],
            timeout=120,
        )
        # One CPU per node and one per training worker: the two workers need both nodes.
        cluster.start_head(num_cpus=1)
        cluster.add_node(num_cpus=1)
        job, output = submit(
            cluster,
            "demo-two-nodes",
            ["--runtime-env", "jobs/runtime_env.yaml"],
            [
                *tiny_model_overrides,
                "train.run_name=demo-s3",
                f"data.train={bucket}/synthetic/train",
                f"data.s3_endpoint_url={endpoint}",
                f"train.storage={bucket}/runs",
                f"train.log_dir={logs}",
            ],
        )
        nodes = cluster.state("nodes", "state=ALIVE")
        workers = cluster.state("actors", "class_name=RayTrainWorker")
        latest_step = run_python(
            cluster,
            "from ulm_dist.storage import S3Options\n"
            "from ulm_dist.train.checkpoint import CheckpointStore\n"
            f"store = CheckpointStore({bucket + '/runs'!r}, 'demo-s3', S3Options({endpoint!r}))\n"
            "print(store.latest().step)",
        )

    assert len(nodes) == 2, nodes
    assert {worker["node_id"] for worker in workers} == {node["node_id"] for node in nodes}, workers
    assert int(latest_step.split()[-1]) == STEPS
    assert f"checkpoint: {bucket}/runs/demo-s3/checkpoint_{STEPS:08d}" in output
    # The working dir (runtime_env.yaml's `.`) was uploaded and the job ran from it, not from
    # this checkout.
    assert job["runtime_env"]["working_dir"].startswith("gcs://"), job["runtime_env"]
    assert job["driver_node_id"], job
    records = [json.loads(line) for line in (logs / "demo-s3" / METRICS_NAME).open()]
    assert [record["step"] for record in records] == list(range(2, STEPS + 1, 2))
    assert all(record["loss/total"] > 0 for record in records)


WAIT_AND_CREATE_BUCKET = """
import time, urllib.request
import boto3
for _ in range(300):
    try:
        urllib.request.urlopen("{endpoint}", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
boto3.client("s3", endpoint_url="{endpoint}", region_name="us-east-1").create_bucket(
    Bucket="{bucket}"
)
"""


def run_python(cluster: LoopbackCluster, code: str) -> str:
    return cluster.run(["python", "-c", code], timeout=120)
