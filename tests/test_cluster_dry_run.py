"""The cluster dry run end to end (``cluster/dry_run.py``, ``make cluster-dry-run``): a head and two worker nodes in
their own mount namespaces, S3 on loopback, the sweep submitted with ``ray job submit``, a worker node killed
mid-trial. Asserted from the script's JSON report, which it builds from the published manifest, Ray Train's
record of each run's attempts and the checkpoints on S3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.ray,
    pytest.mark.cluster,
    pytest.mark.skipif(os.geteuid() != 0, reason="worker nodes need mount namespaces: run as root"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare(1)"),
]


@pytest.mark.timeout(1500)
def test_the_sweep_survives_a_killed_worker_node_on_an_isolated_local_cluster(tmp_path):
    pytest.importorskip("moto.server")
    report_file = tmp_path / "report.json"
    # a short work dir: Ray's session sockets live under it, and an AF_UNIX path is at most 107 bytes
    work = Path(tempfile.mkdtemp(prefix="dry-", dir="/tmp"))
    try:
        result = subprocess.run(
            [sys.executable, str(ROOT / "cluster" / "dry_run.py"), "--workdir", str(work),
             "--report", str(report_file)],
            capture_output=True, text=True, timeout=1400,
        )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert report_file.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_file.read_text())
    failed = [name for name, ok in report["expectations"].items() if not ok]
    assert not failed, f"{failed}\n{result.stdout[-4000:]}"
    assert result.returncode == 0

    assert report["job_status"] == "SUCCEEDED"
    workers = {"worker-1", "worker-2"}
    trials = report["trial_nodes"]
    assert len(trials) == 2  # two languages × one rank
    assert all(row["nodes"] and set(row["nodes"]) <= workers for row in trials.values()), trials

    resumed = report["resumed"]
    killed = resumed["killed_node"]
    assert killed in workers
    (first_status, first_nodes), *later = resumed["attempts"]
    assert (first_status, first_nodes) == ("ERRORED", [killed])  # the killed node ran the trial until the kill
    assert any(status == "FINISHED" and nodes and killed not in nodes for status, nodes in later)
    assert resumed["checkpoints_before"] and resumed["checkpoints_after"]
    assert resumed["final_step"] == 16  # train.max_steps of ray_jobs/configs/dry_run.yaml

    load = report["adapter_load"]
    assert "error" not in load and load["node"] not in load["trained_on"]
    assert load["node"] == "worker-3"  # a node started after the sweep, with empty caches
