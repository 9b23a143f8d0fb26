import pytest

from unet_dist import checkpoint
from unet_dist.config import (AugmentConfig, Config, ModelConfig, from_dict, load_config, model_config_from_dict,
                              parse_override, to_dict)
from unet_dist.errors import UserError

from helpers import CONFIGS


def test_shipped_configs_load():
    for path in CONFIGS.glob("*.yaml"):
        cfg = load_config(path)
        assert isinstance(cfg, Config)
    isbi = load_config(CONFIGS / "isbi2012.yaml")
    assert isbi.data.train_slices == [0, 25] and isbi.data.val_slices == [25, 30]
    assert isbi.model.dims == 2 and isbi.train.optimizer == "adam" and isbi.train.loss in ("bce", "bce_dice")


def test_overrides_apply_with_types():
    cfg = load_config(CONFIGS / "smoke.yaml", ["train.lr=3e-4", "model.base_channels=32",
                                                "data.patch_size=[32,32]", "data.augment.elastic=true",
                                                "run.dir=/tmp/x"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.base_channels == 32
    assert cfg.data.patch_size == [32, 32]
    assert cfg.data.augment.elastic is True
    assert cfg.run.dir == "/tmp/x"


def test_int_accepted_for_float():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize("override, words", [
    ("train.lrr=1", ["train.lrr", "did you mean 'lr'"]),
    ("trian.lr=1", ["trian", "did you mean 'train'"]),
    ("train.steps=abc", ["train.steps", "expected int"]),
    ("train.steps=1.5", ["train.steps", "expected int"]),
    ("train.precision=fp8", ["train.precision", "'bf16'"]),
    ("model.dims=4", ["model.dims"]),
    ("data.augment.flip=3", ["data.augment.flip", "expected bool"]),
    ("data.patch_size=[64,64,64]", ["data.patch_size", "model.dims"]),
    ("train.lr", ["KEY=VALUE"]),
    ("train=3", ["train", "mapping"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(UserError) as exc:
        load_config(CONFIGS / "smoke.yaml", [override])
    for word in words:
        assert word in str(exc.value)


def test_bad_yaml_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stpes: 10\n")
    with pytest.raises(UserError) as exc:
        load_config(path)
    assert str(path) in str(exc.value) and "train.stpes" in str(exc.value) and "steps" in str(exc.value)
    path.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(UserError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("run:\n  dir: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(path)


def test_roundtrip_through_dict():
    cfg = load_config(CONFIGS / "isbi2012.yaml", ["train.lr=5e-4"])
    assert from_dict(to_dict(cfg)) == cfg
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


def test_config_show_cli(cli):
    done = cli("config", "show", CONFIGS / "smoke.yaml", "train.lr=0.01")
    assert done.code == 0, done.err
    assert "lr: 0.01" in done.out and "store:" in done.out
    bad = cli("config", "show", CONFIGS / "smoke.yaml", "train.lrr=0.01")
    assert bad.code == 2 and bad.err.count("\n") == 1 and "train.lrr" in bad.err and "Traceback" not in bad.err


@pytest.mark.parametrize("key, value, problem", [
    ("depth", 0, "must be >= 1"),
    ("out_channels", 0, "must be >= 1"),
    ("anisotropic_levels", 1, "1 needs model.dims 3 (got 2)"),
    ("norm", "bn", "expected 'batch' | 'group' | 'instance' | 'none'"),
])
def test_model_rules_are_the_same_from_yaml_a_checkpoint_and_code(tmp_path, key, value, problem):
    """One rule, one message: a YAML model section, a checkpoint's model_config (and its stored
    config) and a ModelConfig built in code are refused alike."""
    from unet_dist import model as M

    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  {key}: {value}\n")
    bad = {**to_dict(ModelConfig()), key: value}
    refusals = []
    for attempt in (lambda: load_config(path), lambda: model_config_from_dict(bad, "ckpt"),
                    lambda: from_dict({"model": bad}, "ckpt"), lambda: M.build_model(ModelConfig(**{key: value}))):
        with pytest.raises(UserError) as exc:
            attempt()
        refusals.append(str(exc.value))
    words = {r.split(": ", 1)[1] for r in refusals}  # the message without its source
    assert len(words) == 1 and f"model.{key}: {problem}" in words.pop()


def test_an_older_checkpoints_model_config_gets_the_defaults(tmp_path):
    """A model_config from before a key existed loads, the missing keys at config/sections.py's defaults."""
    stored = to_dict(ModelConfig(depth=2, base_channels=4))
    del stored["anisotropic_levels"], stored["padding"]
    path = checkpoint.save(tmp_path / "ck", {"model": {}, "model_config": stored, "step": 1}, keep_last=1)
    model = model_config_from_dict(checkpoint.load(path)["model_config"], str(path))
    assert model == ModelConfig(depth=2, base_channels=4)
    with pytest.raises(UserError, match="ckpt: unknown key 'model.dpeth' .did you mean 'depth'"):
        model_config_from_dict({"dpeth": 2}, "ckpt")
    with pytest.raises(UserError, match="ckpt: expected a mapping of model keys"):
        model_config_from_dict([2], "ckpt")


def test_augment_rules_apply_when_the_config_loads():
    with pytest.raises(UserError, match="^command line: data.augment.misalign_p: must be a probability"):
        load_config(None, ["data.augment.misalign_p=2"])
    with pytest.raises(UserError, match="^command line: data.augment.elastic_grid: must be >= 2"):
        load_config(None, ["data.augment.elastic_grid=1"])


def test_disabled_augmentation_turns_every_switch_off():
    off = AugmentConfig.disabled()
    assert not (off.flip or off.rot90 or off.elastic or off.intensity)
    assert off.noise_std == off.missing_section_p == off.misalign_p == 0
