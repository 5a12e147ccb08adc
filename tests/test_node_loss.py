"""Losing a whole node mid-job, for real: a multi-raylet Ray cluster on this machine
(``ray.cluster_utils.Cluster``, as Ray's own tests do), one node removed while the job runs."""

import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))

FAST = ["--steps", "3", "--views", "2", "--resolution", "24", "--no-mesh", "--turntable-frames", "4",
        "--turntable-size", "32", "--no-progress", "--no-gallery", "--part-size", "2"]
TIMINGS = {"t_sample_s", "t_export_s", "t_score_s", "t_total_s"}


@pytest.fixture
def two_node_cluster(monkeypatch):
    """A head without CPUs and two 1-CPU worker nodes; jobs join it through RAY_ADDRESS."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
    cluster.wait_for_nodes()
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_regeneration_survives_losing_a_node_with_the_uninterrupted_manifest(tmp_path, two_node_cluster):
    import regenerate

    cluster, nodes = two_node_cluster
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": [f"a red cube number {i}" for i in range(16)]}), prompts)
    out = tmp_path / "out"
    removed = {}

    def lose_a_node():
        deadline = time.time() + 120
        while len(list(out.rglob("done.json"))) < 4 and time.time() < deadline:
            time.sleep(0.05)
        removed["done"] = len(list(out.rglob("done.json")))
        cluster.remove_node(nodes[1])

    killer = threading.Thread(target=lose_a_node, daemon=True)
    killer.start()
    args = ["--prompts", str(prompts), *FAST]
    summary = regenerate.main(args + ["--out", str(out), "--actors", "2", "--cpus-per-actor", "1"])
    killer.join()
    assert 4 <= removed["done"] < 16, "the node was not lost mid-run"
    assert summary["made"] + summary["skipped"] == 16 and summary["errors"] == 0
    full = tmp_path / "full"
    regenerate.main(args + ["--out", str(full), "--actors", "0"])
    stable = lambda d: [{k: v for k, v in r.items() if k not in TIMINGS}  # noqa: E731
                        for r in pq.read_table(d / "manifest.parquet").to_pylist()]
    assert stable(out) == stable(full)  # every asset once, the same values
