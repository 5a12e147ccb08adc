"""Losing a whole node mid-job, for real: a multi-raylet Ray cluster on this machine
(``ray.cluster_utils.Cluster``, as Ray's own tests do), one node removed while the job runs."""

import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))

FAST = ["--steps", "3", "--views", "2", "--resolution", "24", "--no-mesh", "--turntable-frames", "4",
        "--turntable-size", "32", "--no-progress", "--no-gallery", "--part-size", "2"]
TIMINGS = {"t_sample_s", "t_export_s", "t_score_s", "t_total_s"}


@contextmanager
def _cluster(monkeypatch, cpus_per_node: int):
    """A head without CPUs and two worker nodes of ``cpus_per_node`` CPUs; jobs join it through RAY_ADDRESS."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=cpus_per_node), cluster.add_node(num_cpus=cpus_per_node)]
    cluster.wait_for_nodes()
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def two_node_cluster(monkeypatch):
    """Two 1-CPU nodes."""
    with _cluster(monkeypatch, 1) as c:
        yield c


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


@pytest.fixture
def two_big_nodes(monkeypatch):
    """Two 2-CPU nodes: room for two 1-CPU training workers and a reward actor, and, after one node is
    lost, for one worker and the (restarted) reward actor."""
    with _cluster(monkeypatch, 2) as c:
        yield c


def _node_to_lose(nodes, workers, reward_actor):
    """The node whose loss hurts most: the reward actor's when a training worker shares it (both are lost),
    else the one running training workers."""
    by_id = {n.node_id: n for n in nodes}
    worker_nodes = {w.node_id for w in workers}
    if reward_actor.node_id in worker_nodes:
        return by_id[reward_actor.node_id]
    return by_id[next(iter(worker_nodes))]


@pytest.mark.slow
def test_training_loses_a_node_and_goes_on_with_the_workers_left(tmp_path, two_big_nodes, monkeypatch):
    """Two workers and a reward actor on a 2-node cluster; a node is removed after the second checkpoint.
    Ray Train re-forms the worker group with the one worker that still fits (scale.min_workers=1), it
    resumes from the newest checkpoint, every epoch is recorded once, and the reward actor (restarted when
    its node was the one lost) keeps scoring: the job does not fail."""
    import json
    import threading

    from ray.util.state import list_actors

    from helpers import save_tiny_weights
    from r2d3.config import build_config
    from r2d3.ray.train import fit_on_ray
    from r2d3.train.config import AlignConfig

    cluster, nodes = two_big_nodes
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")  # how long a group of 2 is tried
    weights = save_tiny_weights(tmp_path / "w")
    runs = tmp_path / "runs"
    epochs = 8
    config = build_config(AlignConfig, overrides=[
        f"model.weights={weights}", "reward=colorfulness", "train.sample_batch_size=4", "train.train_batch_size=2",
        "sampler.num_steps=4", "render.num_views=2", "render.resolution=16", "eval.num_prompts=2",
        "eval.seeds_per_prompt=1", f"run.output_dir={runs}", "run.name=elastic", "run.progress=false",
        "run.log_images_every=0", "run.checkpoint_every=1", "run.wandb_mode=disabled", f"train.epochs={epochs}",
        "scale.num_workers=2", "scale.min_workers=1", "scale.cpus_per_worker=1", "scale.reward_actors=1",
        "scale.max_failures=2"])
    run_dir = runs / "elastic"
    result, lost = {}, {}

    def alive(cls):
        return list_actors(filters=[("class_name", "=", cls), ("state", "=", "ALIVE")])

    thread = threading.Thread(target=lambda: result.update(r=fit_on_ray(config, run_dir, str(runs))))
    started = time.time()
    thread.start()
    deadline = time.time() + 300
    while len(list(run_dir.glob("checkpoint_2*"))) < 2 and time.time() < deadline:  # Ray Train's checkpoints
        time.sleep(0.1)
    workers, scorers = alive("RayTrainWorker"), alive("RewardActor")
    assert len(workers) == 2 and len(scorers) == 1, (workers, scorers)
    node = _node_to_lose(nodes, workers, scorers[0])
    lost.update(checkpoints=len(list(run_dir.glob("checkpoint_2*"))),
                reward_actor=scorers[0].node_id == node.node_id,
                workers=sum(w.node_id == node.node_id for w in workers))
    cluster.remove_node(node)
    lost_at = time.time()
    thread.join(timeout=600)
    assert not thread.is_alive(), "the run did not finish after the node was lost"
    assert result["r"].error is None, result["r"].error
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == list(range(1, epochs + 1))  # every epoch once
    assert len(summary["resumes"]) == 1 and summary["resumes"][0] >= lost["checkpoints"] - 1 >= 1, summary["resumes"]
    after = [h for h in summary["history"] if h["epoch"] > summary["resumes"][0]]
    assert {h["world_size"] for h in after} == {1}, after  # re-formed with the one worker that fits
    scorer = list_actors(filters=[("class_name", "=", "RewardActor")], detail=True)
    if lost["reward_actor"]:
        assert any(a.num_restarts >= 1 and a.state == "ALIVE" for a in scorer), scorer
    print(f"lost a node after {lost_at - started:.1f} s ({lost}); finished {time.time() - lost_at:.1f} s "
          f"later, resumed at epoch {summary['resumes'][0]}")


@pytest.mark.slow
def test_a_reward_actor_on_a_lost_node_is_restarted_on_another_and_scores_the_same(two_node_cluster):
    """The trainers' render/reward actor lives on the node that is removed: Ray restarts it on the other
    node (``max_restarts``) and the next call, retried there, returns the same rewards and gradients."""
    from dataclasses import replace

    import torch
    from ray.util.state import list_actors

    from r2d3.backends import TinySplatBackend
    from r2d3.config import RenderConfig, ScaleConfig
    from r2d3.data.procedural import VOCABULARY
    from r2d3.pipeline import Pipeline
    from r2d3.ray.reward_actors import make_remote_scorer, start_reward_actors
    from r2d3.rewards import build_reward
    from r2d3.train.config import AlignConfig

    cluster, nodes = two_node_cluster
    render = RenderConfig(num_views=2, resolution=16, backend="torch")
    config = replace(AlignConfig(), reward="colorfulness", render=render,
                     scale=ScaleConfig(reward_actors=1, reward_actor_cpus=1.0))
    pool = start_reward_actors(config)
    backend = TinySplatBackend.random_init(num_gaussians=24, dim=16, vocab=VOCABULARY)
    ctx = Pipeline(backend, None, render, 1.0, None, build_reward("colorfulness").requires_grad_(False),
                   scorer=make_remote_scorer(config))
    prompts = ["a red cube", "a blue sphere"]
    cams = ctx.cameras(2, torch.Generator().manual_seed(1))
    x = torch.randn(2, 24, 9, generator=torch.Generator().manual_seed(2)) * 0.4

    def score():
        z = x.clone().requires_grad_(True)
        r = ctx.reward_of_latents(z, prompts, cams)
        return r.detach(), torch.autograd.grad(r.sum(), z)[0]

    before = score()
    (actor,) = list_actors(filters=[("class_name", "=", "RewardActor"), ("state", "=", "ALIVE")])
    lost = next(n for n in nodes if n.node_id == actor.node_id)
    cluster.remove_node(lost)
    after = score()
    torch.testing.assert_close(after[0], before[0])
    torch.testing.assert_close(after[1], before[1])
    (moved,) = list_actors(filters=[("class_name", "=", "RewardActor"), ("state", "=", "ALIVE")], detail=True)
    assert moved.actor_id == actor.actor_id and moved.node_id != lost.node_id and moved.num_restarts >= 1
    del pool
