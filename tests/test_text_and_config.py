"""Offline text encoder, typed configuration and prompt sources."""

import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from r2d3.text import BOS, PAD, TextEncoder, WordTokenizer
from r2d3.cli import describe, parse_cli
from r2d3.config import ConfigError, build_config, to_yaml
from r2d3.train.config import AlignConfig
from r2d3.data.prompts import PromptSourceError, load_prompts


def test_tokenizer_known_unknown_and_empty():
    tok = WordTokenizer(["a", "red", "cube"], num_hash_buckets=8, max_length=6)
    ids, mask = tok(["A red CUBE!", "a zorblax cube", ""])
    assert ids[0].tolist()[:4] == [BOS, 2, 3, 4]
    unknown = ids[1, 2].item()
    assert unknown >= 2 + 3 and unknown == tok.token_id("zorblax")  # stable hash bucket
    assert ids[2].tolist() == [BOS, PAD, PAD, PAD] and mask[2].tolist() == [True, False, False, False]


def test_tokenizer_truncates_long_prompts_with_a_warning():
    tok = WordTokenizer(["a"], max_length=4)
    with pytest.warns(UserWarning, match="truncated"):
        ids, _ = tok(["a a a a a a a"])
    assert ids.shape == (1, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(["a a"])


def test_tokenizer_rejects_non_strings():
    tok = WordTokenizer(["a"])
    with pytest.raises(TypeError, match="prompt must be a string"):
        tok(["ok", 3])
    with pytest.raises(TypeError, match="not a single string"):
        tok("a red cube")


def test_text_encoder_masks_padding():
    enc = TextEncoder(vocab=("a", "red"), dim=16, num_layers=1, num_heads=2)
    short = enc(["a red"])
    padded = enc(["a red", "a red a red a red"])
    torch.testing.assert_close(padded.tokens[0, :3], short.tokens[0], atol=1e-5, rtol=1e-5)
    assert (padded.tokens[0, 3:] == 0).all()


def test_each_algorithm_has_its_own_option_group(tmp_path):
    from r2d3.algos.ddpo import DDPOConfig
    from r2d3.algos.nabla_gfn import NablaGFNConfig
    from r2d3.algos.refl import ReFLConfig
    from r2d3.config import from_dict, to_dict

    assert type(AlignConfig().algo) is NablaGFNConfig
    ddpo = build_config(AlignConfig, overrides=["algo.name=ddpo", "algo.clip_range=0.2"]).algo
    assert ddpo == DDPOConfig(clip_range=0.2) and not hasattr(ddpo, "beta")
    with pytest.raises(ConfigError, match=r"algo.beta: no such option in DDPOConfig \(the options of algo.name=ddpo"):
        build_config(AlignConfig, overrides=["algo.name=ddpo", "algo.beta=5"])
    with pytest.raises(ConfigError, match="algo.name: unknown algorithm 'dpo'; valid algorithms: ddpo, draft"):
        build_config(AlignConfig, overrides=["algo.name=dpo"])
    # a file tuned for Nabla-R2D3 reruns with another algorithm by one override: shared options carry over
    tuned = tmp_path / "tuned.yaml"
    tuned.write_text("algo: {beta: 3.0e4, timestep_fraction: 0.25, reg_scale: 10.0}\n")
    assert build_config(AlignConfig, [tuned], ["algo.name=ddpo"]).algo == DDPOConfig(timestep_fraction=0.25)
    assert build_config(AlignConfig, [tuned], ["algo.name=refl"]).algo == ReFLConfig()
    back = build_config(AlignConfig, [tuned], ["algo.name=ddpo", "algo.name=nabla_gfn"]).algo  # the last wins
    assert back == NablaGFNConfig(beta=3e4, timestep_fraction=0.25, reg_scale=10.0)
    for name in ("nabla_gfn", "ddpo", "refl", "draft"):  # saved and rebuilt (checkpoints, Ray payloads) exactly
        config = build_config(AlignConfig, overrides=[f"algo.name={name}"])
        assert from_dict(AlignConfig, to_dict(config)) == config
        assert type(from_dict(AlignConfig, to_dict(config)).algo) is type(config.algo)


def test_a_sweep_may_sample_the_algorithm():
    from r2d3.ray.tune.space import SpaceError, apply_params

    config = apply_params(AlignConfig(), {"algo.clip_range": 0.3, "algo.name": "ddpo"})  # the name is set first
    assert (config.algo.name, config.algo.clip_range) == ("ddpo", 0.3)
    with pytest.raises(SpaceError, match="algo.beta: .*no such option in DDPOConfig"):
        apply_params(AlignConfig(), {"algo.name": "ddpo", "algo.beta": 1.0})


def test_config_overrides_and_errors(tmp_path):
    cfg = build_config(AlignConfig, overrides=["algo.beta=5e3", "reward={dnc: 1.0, colorfulness: 0.5}"])
    assert cfg.algo.beta == 5e3 and cfg.reward == {"dnc": 1.0, "colorfulness": 0.5}
    # a dotted key inside the free-form reward spec sets that key only (a paper setup's weights path)
    (tmp_path / "r.yaml").write_text("reward: {name: laion_aesthetic, kwargs: {weights: /models/clip, dtype: float32}}\n")
    cfg = build_config(AlignConfig, files=[tmp_path / "r.yaml"], overrides=["reward.kwargs.weights=/mnt/clip"])
    assert cfg.reward == {"name": "laion_aesthetic", "kwargs": {"weights": "/mnt/clip", "dtype": "float32"}}
    assert build_config(AlignConfig, files=[tmp_path / "r.yaml"], overrides=["reward={dnc: 1.0}"]).reward == {"dnc": 1.0}
    with pytest.raises(ConfigError, match="algo.beta"):
        build_config(AlignConfig, overrides=["algo.beta=lots"])
    with pytest.raises(ConfigError, match="nosuch"):
        build_config(AlignConfig, overrides=["algo.nosuch=1"])
    with pytest.raises(ConfigError, match=r"scale.min_workers \(3\) must be <= scale.num_workers \(2\)"):
        build_config(AlignConfig, overrides=["scale.num_workers=2", "scale.min_workers=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        build_config(AlignConfig, overrides=["algo.beta"])
    with pytest.raises(ConfigError, match="not found"):
        build_config(AlignConfig, files=[tmp_path / "missing.yaml"])
    (tmp_path / "a.yaml").write_text("train:\n  lr: 0.5\n")
    (tmp_path / "b.yaml").write_text("train: [unclosed\n")
    assert build_config(AlignConfig, files=[tmp_path / "a.yaml"], overrides=["train.epochs=3"]).train.lr == 0.5
    with pytest.raises(ConfigError, match="b.yaml"):
        build_config(AlignConfig, files=[tmp_path / "b.yaml"])


def test_config_yaml_round_trip_and_help(tmp_path, capsys):
    cfg = build_config(AlignConfig, overrides=["run.seed=7"])
    (tmp_path / "saved.yaml").write_text(to_yaml(cfg))
    assert build_config(AlignConfig, files=[tmp_path / "saved.yaml"]) == cfg
    lines = "\n".join(describe(AlignConfig))
    for key in ("run.seed", "algo.beta", "algo.reg_scale", "train.lr", "sampler.guidance_scale", "scale.num_workers"):
        assert key in lines
    with pytest.raises(SystemExit):
        parse_cli(AlignConfig, "align", ["--help"])
    assert "algo.timestep_fraction" in capsys.readouterr().out


def test_prompt_sources(tmp_path):
    (tmp_path / "p.txt").write_text("a red cube\n\n   \na blue torus\n")
    pl = load_prompts(str(tmp_path / "p.txt"))
    assert pl.prompts == ["a red cube", "a blue torus"] and len(pl.skipped) == 2
    pq.write_table(pa.table({"prompt": ["x", None, "y"]}), tmp_path / "s.parquet")
    pl = load_prompts(str(tmp_path / "s.parquet"))
    assert pl.prompts == ["x", "y"] and pl.skipped[0][0] == 1
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(PromptSourceError, match="no 'prompt' column"):
        load_prompts(str(tmp_path / "bad.parquet"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(PromptSourceError, match="no usable prompt"):
        load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(PromptSourceError, match="not found"):
        load_prompts(str(tmp_path / "nope.txt"))


def test_the_configs_choices_are_what_the_implementations_offer():
    from r2d3.config import RENDER_BACKENDS, SAMPLER_KINDS
    from r2d3.diffusion import SCHEDULER_KINDS
    from r2d3.render import SPLAT_BACKENDS

    assert set(RENDER_BACKENDS) == {"auto", *SPLAT_BACKENDS}
    assert SAMPLER_KINDS == SCHEDULER_KINDS
