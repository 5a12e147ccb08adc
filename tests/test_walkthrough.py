"""docs/architecture.md's walkthrough, followed literally: its plugin module, loaded through R2D3_PLUGINS,
adds a reward and an algorithm that ``pipelines/align.py`` then trains with (nothing in r2d3 edited)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def plugin_source() -> str:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    blocks = re.findall(r"```python\n(# my_plugin\.py\n.*?)```", doc, flags=re.S)
    assert len(blocks) == 1, "the walkthrough's plugin module is the one python block starting '# my_plugin.py'"
    return blocks[0]


def test_the_documented_plugin_trains_through_align(tmp_path):
    (tmp_path / "my_plugin.py").write_text(plugin_source())
    env = {**os.environ, "R2D3_PLUGINS": "my_plugin", "PYTHONPATH": str(tmp_path), "WANDB_MODE": "disabled"}
    overrides = ["reward=brightness", "algo.name=late_step_reward", "algo.last_steps=3", "train.epochs=2", "train.sample_batch_size=4",
                 "train.train_batch_size=2", "sampler.num_steps=4", "render.num_views=2", "render.resolution=16",
                 "eval.num_prompts=2", "eval.seeds_per_prompt=2", f"run.output_dir={tmp_path / 'runs'}",
                 "run.name=walk", "run.progress=false", "run.wandb_mode=disabled", "scale.in_process=true"]
    done = subprocess.run([sys.executable, str(ROOT / "pipelines" / "align.py"), *overrides], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    summary = json.loads((tmp_path / "runs" / "walk" / "summary.json").read_text())
    assert [h["optimizer_steps"] for h in summary["history"]] == [2, 4]  # on-policy: 4 samples in train batches of 2
    assert {"reward_mean", "reward_delta_vs_base"} <= set(summary["after"])
    config = (tmp_path / "runs" / "walk" / "config.yaml").read_text()
    assert "name: late_step_reward" in config and "last_steps: 3" in config and "reward: brightness" in config


def test_an_unimportable_plugin_is_named(tmp_path):
    env = {**os.environ, "R2D3_PLUGINS": "no_such_plugin_module"}
    done = subprocess.run([sys.executable, str(ROOT / "pipelines" / "align.py"), "reward=brightness",
                           f"run.output_dir={tmp_path}", "scale.in_process=true"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    assert "R2D3_PLUGINS names 'no_such_plugin_module'" in done.stdout + done.stderr
