import pytest

from polychip.config import ConfigError, build_config, describe, parse_override, preset


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  n_layers: 3\ntrain:\n  lr: 0.01\n  steps: 5\n")
    cfg = build_config("tiny", str(f), ["train.steps=7"])
    assert cfg.model.n_layers == 3 and cfg.train.lr == 0.01 and cfg.train.steps == 7
    assert cfg.model.d_model == preset("tiny").model.d_model


def test_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        build_config("tiny", overrides=["train.lrr=1"])
    with pytest.raises(ConfigError, match="must be an integer"):
        build_config("tiny", overrides=["model.n_layers=2.5"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("nonsense")
    with pytest.raises(ConfigError, match="unknown preset"):
        build_config("huge")
    with pytest.raises(ConfigError, match="not divisible by train.grad_accum"):
        build_config("tiny", overrides=["train.grad_accum=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(None, str(bad))


def test_describe_documents_every_field():
    rows = describe()
    assert len(rows) > 40
    missing = [name for name, _, doc in rows if not doc]
    assert not missing, missing
