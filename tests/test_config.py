import os
import subprocess
import sys

import pytest
import yaml

from framework.config import (Config, ConfigError, apply_overrides, from_dict, load_config,
                              parse_cli, save_config, to_dict)


def write(path, data):
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return str(path)


def test_defaults_round_trip(tmp_path):
    cfg = Config()
    p = tmp_path / "cfg.yaml"
    save_config(cfg, str(p))
    again = load_config(str(p))
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)


def test_round_trip_non_defaults(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-4", "unet.channel_mult=[1,2,4]", "text.null=zeros",
                             "sample.prompts=['a cat', 'a dog']", "deepspeed.wall_clock_breakdown=true"])
    p = tmp_path / "r.yaml"
    save_config(cfg, str(p))
    assert load_config(str(p)) == cfg
    assert cfg.optim.lr == 3e-4 and cfg.unet.channel_mult == [1, 2, 4]
    assert cfg.sample.prompts == ["a cat", "a dog"]
    assert cfg.deepspeed == {"wall_clock_breakdown": True}


def test_typo_names_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.lrr=1e-3"])
    msg = str(e.value)
    assert "optim.lrr" in msg and "Did you mean 'optim.lr'" in msg
    assert "weight_decay" in msg and "warmup_steps" in msg   # the valid keys at that level
    with pytest.raises(ConfigError) as e:
        from_dict({"engin": {"zero_stage": 3}})
    assert "Did you mean 'engine'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        from_dict({"engine": {"zero_stag": 3}})
    assert "engine.zero_stag" in str(e.value) and "'engine.zero_stage'" in str(e.value)


def test_type_errors_name_key_type_value():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["engine.zero_stage=two"])
    msg = str(e.value)
    assert "engine.zero_stage" in msg and "int" in msg and "'two'" in msg
    with pytest.raises(ConfigError) as e:
        from_dict({"diffusion": {"schedule": "cosin"}})
    assert "diffusion.schedule" in str(e.value) and "'cosine'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        from_dict({"unet": {"channel_mult": [1, "x"]}})
    assert "unet.channel_mult[1]" in str(e.value)
    with pytest.raises(ConfigError):
        from_dict({"engine": {"progress": 1}})   # bool is not int, int is not bool
    # int -> float is allowed
    assert from_dict({"optim": {"lr": 1}}).optim.lr == 1.0


def test_override_precedence(tmp_path):
    base = write(tmp_path / "base.yaml", {"optim": {"lr": 1e-3, "warmup_steps": 7}, "seed": 1})
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "optim": {"lr": 5e-4}})
    cfg = load_config(child)
    assert cfg.optim.lr == 5e-4            # file over its base
    assert cfg.optim.warmup_steps == 7     # base over defaults
    assert cfg.seed == 1
    assert cfg.optim.weight_decay == Config().optim.weight_decay   # defaults where nobody says
    cfg = load_config(child, ["optim.lr=2e-4", "optim.lr=3e-4"])
    assert cfg.optim.lr == 3e-4            # CLI over file, last override wins


def test_base_cycle_and_missing(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(None, ["seed.x=1"])


def test_parse_cli_and_local_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = parse_cli(["--local_rank=1", "engine.steps=5"])
    assert cfg.engine.steps == 5
    assert os.environ["LOCAL_RANK"] == "1"


def test_all_presets_load():
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    found = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".yaml"):
                load_config(os.path.join(dirpath, f))
                found += 1
    assert found >= 1
