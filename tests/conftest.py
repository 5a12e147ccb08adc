"""Shared fixtures: quiet, offline logging, a local S3-compatible server and one Ray instance."""

import os
import socket

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (the real S3 protocol over HTTP), with the standard AWS variables
    pointing at it so boto, s3fs, pyarrow and Ray workers started afterwards all use it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def _ray_session(s3_server):
    import ray

    yield ray
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_local(_ray_session):
    """A local Ray with oversubscribed logical CPUs (Ray Data + Train would deadlock on 2); started
    once (after the S3 server, so workers inherit its variables) and again if a test shut it down."""
    ray = _ray_session
    if not ray.is_initialized():
        ray.init(num_cpus=4, configure_logging=False, log_to_driver=False)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def _rgb_grad_matches_finite_differences(reward, render, prompts, indices, eps: float = 1e-6) -> None:
    """Backpropagate ``reward(render)`` to the rendered RGB and compare entries ``indices`` with central
    differences (float64 renders)."""
    import torch

    from r2d3.render.output import RenderOutput

    rgb = render.rgb.clone().requires_grad_(True)
    render.rgb = rgb
    reward(render, prompts).sum().backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    for idx in indices:
        with torch.no_grad():
            plus, minus = rgb.detach().clone(), rgb.detach().clone()
            plus[idx] += eps
            minus[idx] -= eps
            f = [reward(RenderOutput(x, render.alpha, render.depth, render.normal, None), prompts).item()
                 for x in (plus, minus)]
        fd = (f[0] - f[1]) / (2 * eps)
        assert abs(fd - rgb.grad[idx].item()) <= 1e-8 + 1e-5 * abs(fd), (idx, fd, rgb.grad[idx].item())


@pytest.fixture
def rgb_fd_check():
    """The finite-difference check of a reward's gradient w.r.t. the rendered RGB."""
    return _rgb_grad_matches_finite_differences
