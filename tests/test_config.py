"""Typed config loading: defaults, YAML, overrides, and errors that name the key."""
from __future__ import annotations

import pytest

from cdad_dist.config import DEFAULT_CONFIG, apply_overrides, config_to_dict, load_config
from cdad_dist.engine.trainer import task_slice
from cdad_dist.errors import ConfigError


def test_default_config_is_the_demo():
    cfg = load_config()
    assert DEFAULT_CONFIG.name == "demo.yaml"
    assert cfg.name == "demo" and cfg.sequence == "demo-3x2" and cfg.model.preset == "tiny"


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.lr=1e-4", "data.batch_size=3", "sequence=[[demo/carpet], [demo/nut]]",
                             "eval.max_test_per_class=null", "model.block_out_channels=[8, 16]"])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.batch_size == 3
    assert cfg.sequence == [["demo/carpet"], ["demo/nut"]]
    assert cfg.model.block_out_channels == (8, 16)


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="trian"):
        load_config(None, ["trian.lr=1"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(None, ["data.batch_size=eight"])
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=fast"])


def test_nested_module_config_errors_are_named():
    with pytest.raises(ConfigError, match="continual.strategy"):
        load_config(None, ["continual.strategy=magic"])


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.lr"])


def test_task_slice_override_stays_a_string():
    assert load_config(None, ["tasks=1:2"]).tasks == "1:2"


def test_config_round_trips_through_dict():
    cfg = load_config(None, ["train.lr=2e-4"])
    again = load_config(None, [f"train.lr={config_to_dict(cfg)['train']['lr']}"])
    assert config_to_dict(again) == config_to_dict(cfg)


@pytest.mark.parametrize("spec,n,expected", [(None, 3, [0, 1, 2]), ("1:3", 3, [1, 2]), ("2", 3, [2]), ("1:", 3, [1, 2])])
def test_task_slices(spec, n, expected):
    assert list(task_slice(spec, n)) == expected


@pytest.mark.parametrize("spec", ["3:5", "2:1", "a:b"])
def test_bad_task_slices(spec):
    with pytest.raises(ConfigError, match="tasks"):
        task_slice(spec, 3)


@pytest.mark.parametrize("path", sorted((DEFAULT_CONFIG.parent).rglob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load_and_name_known_sequences(path):
    from cdad_dist.data.sequences import resolve_sequence

    cfg = load_config(path)
    assert len(resolve_sequence(cfg.sequence)) >= 2


def test_a_bad_set_is_blamed_on_the_set_with_its_dotted_key(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("train:\n  lr: 0.001\n")
    with pytest.raises(ConfigError, match=r"^--set train\.lr=fast: key 'train\.lr' must be float"):
        load_config(path, ["data.batch_size=2", "train.lr=fast"])
    with pytest.raises(ConfigError, match=r"^--set train\.lrr=1: unknown key\(s\) train\.lrr$"):
        load_config(path, ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"^--set eval\.metrics\.pixel_key_bits=40: eval\.metrics\.pixel_key_bits"):
        load_config(path, ["eval.metrics.pixel_key_bits=40"])
    (tmp_path / "bad.yaml").write_text("eval:\n  metrics:\n    pro_fpr_limits: 0.3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key\(s\) eval\.metrics\.pro_fpr_limits"):
        load_config(tmp_path / "bad.yaml", ["train.lr=0.1"])


def test_sets_that_depend_on_each_other_are_judged_together(tmp_path):
    """A source and the path it needs, in either order; a later bad --set is still the one blamed."""
    gen = tmp_path / "gen"
    for part in ("text_encoder", "tokenizer", "unet", "vae"):
        (gen / part).mkdir(parents=True)
    both = [f"continual.replay.generative.generator_path={gen}", "continual.replay.source=generative"]
    for sets in (both, both[::-1]):
        assert load_config(None, sets).continual.replay.source == "generative"
    with pytest.raises(ConfigError, match=r"^--set train\.lr=fast"):
        load_config(None, both[::-1] + ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"^--set continual\.replay\.source=generative: .*generator_path"):
        load_config(None, ["continual.replay.source=generative", "train.lr=0.1"])


def test_metric_settings_come_from_yaml():
    cfg = load_config(None, ["eval.metrics.pixel_key_bits=32", "eval.metrics.pro_fpr_limit=0.05"])
    assert cfg.eval.metrics.pixel_key_bits == 32 and cfg.eval.metrics.pro_fpr_limit == 0.05


def test_an_empty_config_file_is_an_error(tmp_path):
    for text in ("", "# only a comment\n", "{}\n"):
        (tmp_path / "empty.yaml").write_text(text)
        with pytest.raises(ConfigError, match="empty.yaml: the config file is empty"):
            load_config(tmp_path / "empty.yaml")


@pytest.mark.parametrize("override, key", [
    ("train.incremental_steps=0", "train.incremental_steps"), ("train.incremental_steps=-3", "train.incremental_steps"),
    ("train.warmup_steps=-1", "train.warmup_steps"), ("train.log_every=0", "train.log_every"),
    ("eval.batch_size=0", "eval.batch_size"), ("eval.max_test_per_class=0", "eval.max_test_per_class"),
])
def test_values_that_would_run_wrongly_are_refused(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


# -- comparing a saved run's settings with the current ones (resume, benchmark reuse) ----------------------------
def test_a_key_added_after_the_run_is_no_change_at_its_default_but_is_one_elsewhere(tmp_path):
    """A run saved before a config key existed (e.g. eval.reconstruction.samples) behaved as that key's default:
    resuming it after the upgrade is allowed, while setting the new key to anything else is refused."""
    import json

    from cdad_dist.engine.run_dir import IDENTITY, check_reusable, run_identity, settings_mismatch
    from cdad_dist.errors import CheckpointError

    cfg = load_config(None, [])
    identity = run_identity(cfg, [["demo/carpet"]])
    del identity["config"]["eval.reconstruction.samples"]  # as written before the key existed
    (tmp_path / IDENTITY).write_text(json.dumps(identity))
    assert settings_mismatch(tmp_path, cfg) == []
    check_reusable(tmp_path, cfg, "bench continual")
    changed = load_config(None, ["eval.reconstruction.samples=4", "train.lr=0.1"])
    assert settings_mismatch(tmp_path, changed) == ["eval.reconstruction.samples: (unset) → 4",
                                                    "train.lr: 0.0003 → 0.1"]
    with pytest.raises(CheckpointError, match=r"bench continual: .* other settings \(eval.reconstruction.samples"):
        check_reusable(tmp_path, changed, "bench continual")
