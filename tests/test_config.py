"""Config: presets, validation of every field (types, ranges, names), round trip, model keys."""

import dataclasses
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ci_jax import attacks, config, data, defenses, files, models, perturbations
from ci_jax import settings as settings_lib
from ci_jax.config import Config
from ci_jax.defenses import ci, gmm
from ci_jax.errors import UserError

# --- presets -----------------------------------------------------------------------------------


def test_presets_exist_and_validate():
    assert {"default", "seed", "fast"} <= set(config.PRESETS)
    for name in ("default", "seed", "fast"):
        cfg = config.preset(name)
        assert isinstance(cfg, Config)
        config.validate(cfg)  # no exception


def test_default_preset_is_the_config_defaults():
    assert config.PRESETS["default"] == {}
    assert config.preset("default") == Config()


def test_default_preset_is_the_seed_attack_with_the_threshold_rule():
    cfg = config.preset("default")
    a, px = cfg.attack, cfg.attack.pixel
    assert (cfg.train.model, a.name, a.source, a.target, a.n_poison, px.amplitude) == \
        ("resnet20", "pixel", 0, 2, 1000, 0.25)
    assert (px.row, px.col, px.clip) == (18, 24, False)
    c = cfg.defense.ci
    assert (cfg.defense.name, c.rule, c.tau, c.bic_search) == ("ci", "threshold", 0.5, "ascent")
    assert c.filters == ("median3",)


def test_seed_preset_has_the_notebook_settings():
    cfg = config.preset("seed")
    t, c = cfg.train, cfg.defense.ci
    assert t.model == "resnet20"
    assert t.batch_size == 32
    assert t.optimizer == "sgd"
    assert t.lr == 0.01
    assert t.momentum == 0.9
    assert t.epochs == 10
    assert t.schedule == "constant"
    assert c.filters == ("mean2",)  # the authors' 2x2 mean
    assert c.bic_search == "sweep"
    assert c.k_max == 10
    assert c.reg_covar == 1e-6
    assert c.rule == "top1"


def test_fast_preset_uses_the_small_cnn():
    assert config.preset("fast").train.model == "cnn"


def test_preset_overrides_are_applied_and_validated():
    cfg = config.preset("seed", {"defense.ci.tau": 0.25, "defense.ci.k_max": 4})
    assert (cfg.defense.ci.tau, cfg.defense.ci.k_max, cfg.defense.ci.rule) == (0.25, 4, "top1")
    with pytest.raises(UserError, match="k_max"):
        config.preset("seed", {"defense.ci.k_max": 0})


def test_preset_overrides_may_nest_sections():
    nested = config.preset("seed", {"defense": {"ci": {"tau": 0.25}}, "train": {"epochs": 2}})
    dotted = config.preset("seed", {"defense.ci.tau": 0.25, "train.epochs": 2})
    mixed = config.preset("seed", {"defense.ci": {"tau": 0.25}, "train": {"epochs": 2}})
    assert nested == dotted == mixed
    assert nested.train.batch_size == 32  # the rest of the preset stays


def test_unknown_preset_is_a_user_error_listing_the_presets():
    with pytest.raises(UserError, match="nope") as e:
        config.preset("nope")
    for name in ("default", "seed", "fast"):
        assert name in str(e.value)


# --- unknown fields and types ------------------------------------------------------------------


def test_unknown_field_is_a_user_error_naming_it_and_the_nearest():
    with pytest.raises(UserError, match="n_poisons.*did you mean 'attack.n_poison'"):
        config.replace(Config(), {"attack.n_poisons": 10})
    with pytest.raises(UserError, match="bogus_field"):
        config.preset("default", {"bogus_field": 1})
    with pytest.raises(UserError, match="'defense.ci.tua': did you mean 'defense.ci.tau'"):
        config.preset("default", {"defense": {"ci": {"tua": 1}}})


def test_a_section_given_a_value_or_a_field_given_twice_is_a_user_error():
    with pytest.raises(UserError, match="defense.ci is a section"):
        config.from_dict({"defense": {"ci": 0.5}})
    with pytest.raises(UserError, match="defense.ci.tau is given twice"):
        config.from_dict({"defense": {"ci": {"tau": 0.5}}, "defense.ci.tau": 0.3})


def test_user_error_is_a_value_error():
    # The CLI catches UserError; callers that only know ValueError still catch it too.
    assert issubclass(UserError, ValueError)


def _named(field):
    """A message that names the dotted path as a whole word."""
    return rf"(?<![\w.]){re.escape(field)}(?![\w.])"


@pytest.mark.parametrize("field, value", [
    ("defense.ci.k_max", "3"),          # str for int
    ("train.epochs", 1.5),              # float for int
    ("train.batch_size", True),         # bool for int
    ("attack.n_poison", 10.0),          # a whole float is still not an int
    ("seed", None),
    ("defense.ci.tau", "0.5"),          # str for float
    ("attack.pixel.amplitude", False),  # bool for float
    ("attack.pixel.clip", 1),           # int for bool
    ("train.nesterov", "yes"),
    ("data.dataset", 3),                # int for str
    ("defense.ci.filters", None),
    ("defense.ci.filters", "median3"),  # a name, not a list of names
    ("defense.ci.filters", []),
    ("defense.ci.filters", ["median3", 3]),
])
def test_wrong_type_is_a_user_error_naming_the_field(field, value):
    with pytest.raises(UserError, match=_named(field)):
        config.replace(Config(), {field: value})


@pytest.mark.parametrize("field, value", [("defense.ci.tau", 1), ("attack.pixel.amplitude", 1), ("train.lr", 1)])
def test_int_is_accepted_for_a_float_field(field, value):
    got = settings_lib.get(config.replace(Config(), {field: value}), field)
    assert got == value and type(got) is float


@pytest.mark.parametrize("field, value", [
    ("attack.pixel.amplitude", float("nan")), ("defense.ci.tau", float("inf")), ("train.lr", float("-inf"))])
def test_non_finite_float_is_a_user_error_naming_the_field(field, value):
    with pytest.raises(UserError, match=_named(field)):
        config.replace(Config(), {field: value})


# --- ranges ------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("attack.pixel.amplitude", -0.25),
    ("attack.pixel.amplitude", 0.0),
    ("defense.ci.k_max", 0),
    ("defense.ci.k_max", -1),
    ("defense.ci.tau", -0.1),
    ("train.batch_size", 0),
    ("eval.batch_size", 0),
    ("eval.reserve", -1),
    ("train.epochs", 0),
    ("attack.n_poison", -1),
    ("attack.source", -2),
    ("train.lr", 0.0),
    ("defense.ci.reg_covar", 0.0),
    ("train.weight_decay", -1e-4),
    ("train.momentum", -0.5),
    ("train.momentum", 1.5),
    ("defense.ci.gaussian_sigma", -1.0),
    ("defense.ci.gaussian_sigma", 0.0),  # no "0 means the default" any more
    ("defense.ci.noise_width", 0.0),
    ("defense.ci.noise_width", 1.5),
    ("defense.ci.quant_levels", 1),
    ("defense.ci.alpha", 0.0),
    ("attack.blend.alpha", 1.5),
    ("attack.patch.size", 0),
    ("defense.ac.size", 0.0),
    ("defense.ac.silhouette", -1.5),
    ("defense.ss.eps", 0.7),
])
def test_out_of_range_is_a_user_error_naming_the_field(field, value):
    with pytest.raises(UserError, match=_named(field)):
        config.replace(Config(), {field: value})


@pytest.mark.parametrize("field, value", [
    ("attack.n_poison", 0), ("defense.ci.tau", 0.0), ("defense.ci.k_max", 1), ("train.weight_decay", 0.0),
    ("train.momentum", 0.0), ("train.momentum", 1.0), ("defense.ci.noise_width", 1.0),
    ("defense.ci.quant_levels", 2), ("defense.ci.quant_levels", 256), ("attack.source", -1),
    ("attack.blend.alpha", 1.0), ("eval.reserve", 0), ("defense.ac.silhouette", -1.0)])
def test_range_boundaries_that_are_allowed(field, value):
    assert settings_lib.get(config.replace(Config(), {field: value}), field) == value


# --- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, choices", [
    ("train.model", "vgg16", models.MODELS),
    ("data.dataset", "svhn", data.DATASETS),
    ("defense.ci.filters", ["blur"], perturbations.NAMES),
    ("defense.ci.rule", "top2", ci.RULES),
    ("defense.ci.bic_search", "grid", gmm.BIC_SEARCHES),
    ("defense.ci.covariance", "banded", gmm.COVARIANCES),
    ("defense.ac.reduce", "lda", ("pca", "ica")),
    ("train.optimizer", "rmsprop", config.OPTIMIZERS),
    ("train.schedule", "step", config.SCHEDULES),
    ("attack.selection", "last", attacks.SELECTIONS),
    ("attack.name", "sticker", attacks.NAMES),
    ("defense.name", "sticker", defenses.NAMES),
])
def test_unknown_name_is_a_user_error_listing_the_choices(field, value, choices):
    with pytest.raises(UserError) as e:
        config.replace(Config(), {field: value})
    msg = str(e.value)
    assert field in msg
    assert repr(value[0] if isinstance(value, list) else value) in msg
    for choice in choices:
        assert choice in msg


def test_unknown_name_suggests_the_nearest():
    with pytest.raises(UserError, match="did you mean 'median3'"):
        config.replace(Config(), {"defense.ci.filters": ["mediam3"]})
    with pytest.raises(UserError, match="did you mean 'resnet20'"):
        config.replace(Config(), {"train.model": "resnet02"})


@pytest.mark.parametrize("name", perturbations.NAMES)
def test_every_filter_is_accepted(name):
    assert config.replace(Config(), {"defense.ci.filters": [name]}).defense.ci.filters == (name,)


def test_a_filter_bank_keeps_its_order_and_refuses_a_repeat():
    bank = config.replace(Config(), {"defense.ci.filters": ["mean2", "median3", "noise"]}).defense.ci.filters
    assert bank == ("mean2", "median3", "noise")
    with pytest.raises(UserError, match="defense.ci.filters.*twice"):
        config.replace(Config(), {"defense.ci.filters": ["mean2", "mean2"]})


@pytest.mark.parametrize("name", attacks.NAMES)
def test_every_attack_is_accepted_and_has_its_own_section(name):
    cfg = config.replace(Config(), {"attack.name": name})
    cls = attacks.REGISTRY[name]
    if cls.Settings is None:
        assert cfg.attack_settings() is None
    else:
        assert isinstance(cfg.attack_settings(), cls.Settings)
        assert cfg.attack_settings() is getattr(cfg.attack, name)


@pytest.mark.parametrize("name", defenses.NAMES)
def test_every_defense_is_accepted_and_has_its_own_section(name):
    cls = defenses.REGISTRY[name]
    cfg = config.replace(Config(), {"defense.name": name, "eval.reserve": 100 if cls.needs_reserve else 0})
    assert isinstance(cfg.defense_settings(), cls.Settings)


def test_a_defense_that_needs_held_out_images_asks_for_a_reserve(monkeypatch):
    monkeypatch.setattr(ci.CI, "needs_reserve", True)
    with pytest.raises(UserError, match="defense ci needs clean images.*--eval.reserve"):
        config.replace(Config(), {"defense.name": "ci"})
    assert config.replace(Config(), {"eval.reserve": 100}).eval.reserve == 100


def test_source_equal_to_target_is_a_user_error():
    with pytest.raises(UserError, match="attack.source and attack.target are both class 3"):
        config.replace(Config(), {"attack.source": 3, "attack.target": 3})
    with pytest.raises(UserError, match="attack.source and attack.target"):
        config.replace(Config(), {"attack.target": Config().attack.source})


def test_validate_rejects_a_config_built_directly():
    # dataclasses.replace skips validation; config.validate still catches the bad value.
    cfg = Config()
    bad_ci = dataclasses.replace(cfg.defense.ci, k_max=0)
    bad = dataclasses.replace(cfg, defense=dataclasses.replace(cfg.defense, ci=bad_ci))
    with pytest.raises(UserError, match="defense.ci.k_max"):
        config.validate(bad)
    # ... and the cross-field checks of the sections.
    bad_attack = dataclasses.replace(cfg, attack=dataclasses.replace(cfg.attack, target=0))
    with pytest.raises(UserError, match="attack.source and attack.target"):
        config.validate(bad_attack)


# --- serialization -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "seed", "fast"])
def test_to_dict_from_dict_round_trip(name):
    cfg = config.preset(name, {"defense.ci.tau": 0.3, "defense.ci.filters": ["gaussian", "median3"],
                               "defense.ci.gaussian_sigma": 1.5, "attack.pixel.clip": True})
    d = config.to_dict(cfg)
    assert isinstance(d, dict)
    assert set(d) == {f.name for f in dataclasses.fields(Config)}
    assert d["defense"]["ci"]["filters"] == ["gaussian", "median3"]  # a list: JSON-ready
    assert {"pixel", "patch", "blend"} <= set(d["attack"])  # every attack's section
    assert config.from_dict(d) == cfg


def test_to_dict_is_json_serializable_and_round_trips_through_json():
    import json

    cfg = config.preset("seed", {"attack.n_poison": 7})
    assert config.from_dict(json.loads(json.dumps(config.to_dict(cfg)))) == cfg


def test_from_dict_of_dotted_paths():
    assert config.from_dict({"defense.ci.tau": 0.3, "seed": 4}) == \
        config.replace(Config(), {"defense.ci.tau": 0.3, "seed": 4})


def test_from_dict_validates():
    with pytest.raises(UserError, match="unknown_key"):
        config.from_dict({"unknown_key": 1})
    with pytest.raises(UserError, match="defense.ci.tau"):
        config.from_dict({"defense": {"ci": {"tau": -1.0}}})


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().seed = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().defense.ci.tau = 0.1  # type: ignore[misc]


def test_differences_lists_dotted_paths():
    a = Config()
    b = config.replace(a, {"train.lr": 0.01, "defense.ci.tau": 0.3})
    assert config.differences(a, b) == ["train.lr", "defense.ci.tau"]
    assert config.differences(a, a) == []


# --- what identifies a trained model ---------------------------------------------------------


def _key(cfg, data_hash="data"):
    return config.model_key(cfg, data_hash)


def test_model_identity_is_the_seed_data_training_and_the_chosen_attack():
    ident = config.model_identity(Config())
    assert set(ident) == {"seed", "data", "attack", "train"}
    assert ident["attack"]["name"] == "pixel" and "pixel" in ident["attack"]
    assert not {"patch", "blend", "none"} & set(ident["attack"])  # attacks not chosen
    none = config.model_identity(config.replace(Config(), {"attack.name": "none"}))
    assert set(none["attack"]) == {"name", "source", "target", "n_poison", "selection"}


def test_model_key_is_stable_short_hex():
    key = _key(Config())
    assert key == _key(Config()) == _key(config.preset("default"))
    assert len(key) == 16
    int(key, 16)


def test_model_key_ignores_defense_and_eval_fields():
    base = Config()
    changed = config.replace(base, {
        "defense.name": "ss", "defense.retrain": False, "defense.ci.filters": ["mean3", "noise"],
        "defense.ci.tau": 2.0, "defense.ci.rule": "top1", "defense.ci.k_max": 3,
        "defense.ci.bic_search": "sweep", "defense.ci.covariance": "diag", "defense.ci.reg_covar": 1e-4,
        "defense.ci.gaussian_sigma": 0.5, "defense.ac.dims": 3, "defense.ss.eps": 0.2,
        "eval.batch_size": 128, "eval.reserve": 500})
    assert _key(changed) == _key(base)


def test_model_key_ignores_the_settings_of_attacks_not_chosen():
    base = Config()
    assert _key(config.replace(base, {"attack.patch.size": 5, "attack.blend.alpha": 0.5})) == _key(base)
    patch = config.replace(base, {"attack.name": "patch"})
    assert _key(config.replace(patch, {"attack.pixel.amplitude": 0.5})) == _key(patch)
    assert _key(config.replace(patch, {"attack.patch.size": 5})) != _key(patch)


@pytest.mark.parametrize("field, value", [
    ("train.lr", 0.01), ("seed", 1), ("attack.n_poison", 500), ("train.epochs", 2), ("train.model", "cnn"),
    ("attack.pixel.row", 3), ("attack.pixel.amplitude", 0.5), ("attack.pixel.clip", True), ("attack.source", 1),
    ("attack.target", 3), ("attack.selection", "random"), ("attack.name", "patch"), ("train.batch_size", 64),
    ("train.optimizer", "sgd"), ("train.schedule", "cosine"), ("data.dataset", "fashion_mnist")])
def test_model_key_changes_with_training_fields(field, value):
    base = Config()
    assert settings_lib.get(base, field) != value
    assert _key(config.replace(base, {field: value})) != _key(base)


def test_model_key_changes_with_the_data():
    assert _key(Config(), "a") != _key(Config(), "b")


def test_fingerprint_is_of_the_value_not_its_spelling():
    assert config.fingerprint({"a": 1, "b": [2, 3]}) == config.fingerprint({"b": (2, 3), "a": 1})
    assert config.fingerprint({"a": 1}) != config.fingerprint({"a": 2})
    assert len(config.fingerprint(config.to_dict(Config()))) == 16


def test_model_key_same_for_int_and_float_spelling_of_a_float_field():
    a = config.replace(Config(), {"attack.pixel.amplitude": 1})    # e.g. {"amplitude": 1} in --config
    b = config.replace(Config(), {"attack.pixel.amplitude": 1.0})  # e.g. --attack.pixel.amplitude 1
    assert a == b
    assert _key(a) == _key(b)
    assert config.to_dict(a) == config.to_dict(b)


def test_model_key_covers_every_field_that_trains_the_model():
    """Every field of seed, data, train and the chosen attack changes the key; eval and defense
    fields do not. A new training field is covered without listing it anywhere."""
    base = config.preset("default")
    key = config.model_key(base, "data")
    for path, leaf in config.PATHS.items():
        head = path.split(".")[0]
        value = config.settings.get(base, path) if hasattr(config, "settings") else None
        other = _another_value(leaf, value)
        if other is None:
            continue
        try:
            changed = config.replace(base, {path: other})
        except UserError:
            continue  # e.g. source equal to target
        moves = config.model_key(changed, "data") != key
        chosen_attack = not path.startswith("attack.") or path.count(".") == 1 or path.startswith("attack.pixel.")
        if head in ("seed", "data", "train") or (head == "attack" and chosen_attack):
            assert moves, path
        else:
            assert not moves, path
    assert config.model_key(base, "other data") != key


def _another_value(leaf, value):
    if leaf.kind is bool:
        return not value
    if leaf.kind is tuple:
        return None if leaf.meta["choices"] is None else (next(c for c in leaf.meta["choices"] if c not in value),)
    if leaf.meta["choices"] is not None:
        return next((c for c in leaf.meta["choices"] if c != value), None)
    if leaf.kind is int:
        return value + 1 if leaf.meta["high"] is None or value < leaf.meta["high"] else value - 1
    if leaf.kind is float:
        return value * 0.5 if value else 0.5
    return None


# --- wrong types and ranges, exhaustively: only UserError, naming the field ----------------------


@pytest.mark.parametrize("field, value", [
    ("defense.ci.k_max", [3]), ("defense.ci.tau", {"value": 0.5}), ("train.lr", None),
    ("train.batch_size", "32"), ("seed", 1.0), ("attack.pixel.amplitude", "0.25"), ("train.epochs", []),
    ("defense.ci.filters", "mean2")])
def test_wrong_type_message_says_what_was_expected(field, value):
    with pytest.raises(UserError, match=_named(field) + ".*expected") as e:
        config.replace(Config(), {field: value})
    if field != "defense.ci.filters":
        assert type(value).__name__ in str(e.value)


@pytest.mark.parametrize("field, value, expected", [
    ("defense.ci.k_max", 0, "from 1 to 1000"), ("train.batch_size", 0, ">= 1"), ("defense.ci.tau", -0.1, ">= 0"),
    ("attack.pixel.amplitude", -1, "> 0"), ("seed", -1, ">= 0"), ("defense.ci.noise_width", 2.0, "> 0.0 and <= 1.0"),
    ("train.momentum", 2.0, "from 0.0 to 1.0"),
    # Beyond int32: the implicit bound is the one stated.
    ("seed", 2**31, "from 0 to 2147483647"), ("train.batch_size", 2**40, "from 1 to 2147483647")])
def test_out_of_range_message_gives_the_range(field, value, expected):
    with pytest.raises(UserError, match=_named(field)) as e:
        config.replace(Config(), {field: value})
    assert expected in str(e.value)


@pytest.mark.parametrize("field, value", [
    ("seed", 2**31), ("defense.ci.k_max", 10**30), ("train.batch_size", 2**64), ("attack.pixel.row", -(10**20)),
    ("attack.source", 10**12),
    ("defense.ci.tau", 10**400),          # finite int, but no float holds it: float() would overflow
    ("train.lr", -(10**400)),
    ("attack.n_poison", 10**5000),        # more digits than str(int) converts: even repr() would raise
    ("attack.pixel.amplitude", 10**5000)], ids=lambda v: v if isinstance(v, str) else f"{v.bit_length()}bits")
def test_huge_int_is_a_user_error_naming_the_field(field, value):
    with pytest.raises(UserError, match=_named(field)) as e:
        config.replace(Config(), {field: value})
    assert len(str(e.value)) < 300


def test_largest_allowed_int():
    assert config.replace(Config(), {"seed": settings_lib.INT_MAX}).seed == 2**31 - 1


def test_long_string_value_is_shortened_in_the_message():
    with pytest.raises(UserError, match="train.model") as e:
        config.replace(Config(), {"train.model": "x" * 10_000})
    assert len(str(e.value)) < 300


@pytest.mark.parametrize("d", [[("seed", 1)], "seed=1", None, 3])
def test_from_dict_of_a_non_mapping_is_a_user_error(d):
    with pytest.raises(UserError, match="mapping"):
        config.from_dict(d)


def test_from_dict_with_a_non_string_key_is_a_user_error():
    with pytest.raises(UserError, match="field"):
        config.from_dict({1: 2})
    with pytest.raises(UserError, match="field"):
        config.from_dict({None: "x", "seed": 1})
    with pytest.raises(UserError, match="field"):
        config.from_dict({"defense": {"ci": {3: 0.5}}})


# --- load_file -----------------------------------------------------------------------------------


def test_load_json_and_yaml_files(tmp_path):
    (tmp_path / "a.json").write_text('{"defense": {"ci": {"tau": 0.3}}, "train.model": "cnn"}')
    (tmp_path / "b.yaml").write_text("# comment\ndefense:\n  ci: {tau: 0.3}\ntrain.model: cnn\n"
                                     "attack.pixel.clip: true\n")
    (tmp_path / "c.YML").write_text("defense.ci.tau: 0.3\n")
    assert config.load_file(tmp_path / "a.json") == {"defense": {"ci": {"tau": 0.3}}, "train.model": "cnn"}
    assert config.load_file(tmp_path / "b.yaml") == {"defense": {"ci": {"tau": 0.3}}, "train.model": "cnn",
                                                     "attack.pixel.clip": True}
    assert config.load_file(str(tmp_path / "c.YML")) == {"defense.ci.tau": 0.3}
    # Each is a valid config: nested sections and dotted paths mean the same.
    cfgs = [config.from_dict(config.load_file(tmp_path / n)) for n in ("a.json", "b.yaml", "c.YML")]
    assert {c.defense.ci.tau for c in cfgs} == {0.3}
    assert cfgs[0].train.model == "cnn" and cfgs[1].attack.pixel.clip


def test_yaml_exponent_without_a_dot_is_a_float(tmp_path):
    # PyYAML alone reads `1e-3` as the string '1e-3' (YAML 1.1 wants `1.0e-3`).
    (tmp_path / "c.yaml").write_text("train.lr: 1e-3\ndefense.ci.reg_covar: 2E+1\nseed: 7\ntrain.model: 1e3x\n")
    d = config.load_file(tmp_path / "c.yaml")
    assert d == {"train.lr": 1e-3, "defense.ci.reg_covar": 20.0, "seed": 7, "train.model": "1e3x"}
    assert type(d["seed"]) is int
    import yaml

    assert yaml.safe_load("lr: 1e-3") == {"lr": "1e-3"}  # the stock loader is left as it was


def _load_error(path) -> str:
    """The one-line UserError naming the file that loading `path` as a config gives."""
    with pytest.raises(UserError) as e:
        config.from_dict(config.load_file(path), f"config file {path}")
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_load_file_missing_unreadable_or_wrong_extension(tmp_path):
    assert "cannot read" in _load_error(tmp_path / "nope.yaml")
    (tmp_path / "dir.json").mkdir()
    assert "not a regular file" in _load_error(tmp_path / "dir.json")
    (tmp_path / "cfg.toml").write_text("seed = 1")
    assert ".toml" in _load_error(tmp_path / "cfg.toml")


def test_invalid_json_gives_the_line(tmp_path):
    (tmp_path / "c.json").write_text('{\n  "seed": 1,\n  "train.epochs": ,\n}')
    msg = _load_error(tmp_path / "c.json")
    assert "not valid JSON" in msg and "line 3" in msg


def test_invalid_yaml_gives_the_line(tmp_path):
    (tmp_path / "c.yaml").write_text("seed: 1\ndefense.ci.filters: [mean2, median3\ntrain.epochs: 3\n")
    msg = _load_error(tmp_path / "c.yaml")
    assert "not valid YAML" in msg and "line" in msg


def test_key_given_twice_and_yaml_aliases(tmp_path):
    (tmp_path / "a.json").write_text('{"seed": 1, "seed": 2}')
    assert "given twice" in _load_error(tmp_path / "a.json")
    (tmp_path / "b.yaml").write_text("train:\n  epochs: 1\n  epochs: 2\n")
    assert "given twice" in _load_error(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("a: &x [1, 2]\nb: *x\n")
    assert "aliases" in _load_error(tmp_path / "c.yaml")


@pytest.mark.parametrize("name, text, expected", [
    ("c.json", "[1, 2]", "JSON object"), ("c.json", '"seed"', "JSON object"),
    ("c.yaml", "- seed\n- 1\n", "YAML mapping"), ("c.yaml", "", "nothing"),
    ("c.yaml", "0.5", "YAML mapping")])
def test_top_level_not_a_mapping(tmp_path, name, text, expected):
    (tmp_path / name).write_text(text)
    assert expected in _load_error(tmp_path / name)


def test_non_utf8_non_string_key_and_huge_int(tmp_path):
    (tmp_path / "a.json").write_bytes(b'{"data.dataset": "\xff"}')
    assert "UTF-8" in _load_error(tmp_path / "a.json")
    (tmp_path / "b.yaml").write_text("1: 2\n")
    assert "key 1" in _load_error(tmp_path / "b.yaml")
    (tmp_path / "c.json").write_text('{"seed": ' + "9" * 5000 + "}")
    _load_error(tmp_path / "c.json")
    (tmp_path / "d.yaml").write_text("seed: " + "9" * 5000 + "\n")
    _load_error(tmp_path / "d.yaml")
    (tmp_path / "e.json").write_text("[" * 100_000)
    _load_error(tmp_path / "e.json")


def test_yaml_aliases_are_refused(tmp_path):
    bomb = tmp_path / "spec.yaml"
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]'] + [
        f'{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]' for i in range(8)]
    bomb.write_text("\n".join(lines) + "\nname: *i\n")
    with pytest.raises(UserError, match="aliases"):
        config.load_file(bomb)


def test_a_config_that_is_not_a_regular_file_is_refused():
    with pytest.raises(UserError, match="not a regular file"):
        config.load_file("/dev/zero.json") if os.path.exists("/dev/zero.json") else \
            files.read_small_text("/dev/zero", "config file")


@pytest.mark.parametrize("name,text", [("c.json", '{"seed": 1, "seed": 2}'), ("c.yaml", "seed: 1\nseed: 2\n"),
                                       ("n.yaml", "train:\n  lr: 0.1\ntrain.lr: 0.2\n")])
def test_keys_given_twice_are_refused(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError, match="given twice"):
        config.flatten(config.load_file(path), str(path))


def test_an_old_flat_field_name_gets_its_new_path():
    with pytest.raises(UserError, match="'tau' is now defense.ci.tau"):
        config.from_dict({"tau": 0.3})


# --- fuzzing: whatever comes in, only a Config or one UserError comes out ------------------------

FIELDS = list(config.PATHS)
SECTIONS = sorted({p.rsplit(".", 1)[0] for p in FIELDS if "." in p})
_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
            | st.sampled_from([-(10**400), 2**31, 2**63, float("nan"), "", "1e-3", "0",
                               *perturbations.NAMES, *attacks.NAMES, "cnn", "sgd"])
            | st.lists(st.sampled_from([*perturbations.NAMES, "blur"]), max_size=3)
            # Too many digits for repr(): built lazily, as hypothesis reprs its strategies.
            | st.integers(4301, 4400).map(lambda n: 10**n))
_KEYS = st.sampled_from(FIELDS + SECTIONS) | st.text(max_size=12) | st.integers() | st.none()
_JSONISH = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.sampled_from(["ci", "tau", "pixel", "row", "name"]) | st.text(max_size=5),
                                          inner, max_size=3), max_leaves=6)
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.dictionaries(_KEYS, _JSONISH, max_size=6))
def test_fuzz_from_dict_gives_a_config_or_one_user_error(d):
    try:
        cfg = config.from_dict(d)
    except UserError as e:
        assert "\n" not in str(e) and len(str(e)) < 1000
    else:
        config.validate(cfg)


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS), _SCALARS, min_size=1, max_size=4))
def test_fuzz_every_field_with_scalars(d):
    try:
        cfg = config.from_dict(d)
    except UserError as e:
        assert "\n" not in str(e)
    else:
        config.validate(cfg)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _load_and_build(path):
    try:
        d = config.load_file(path)
    except UserError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    assert isinstance(d, dict)
    try:
        config.from_dict(d, f"config file {path}")
    except UserError as e:
        assert "\n" not in str(e)


_VALID_YAML = ("defense:\n  ci:\n    tau: 0.5\n    k_max: 4\ntrain:\n  model: cnn\n  lr: 1e-3\n"
               "attack.pixel.clip: true\ndefense.ci.filters: [median3]\n")


def test_the_fuzzed_yaml_is_valid_as_a_whole(tmp_path):
    (tmp_path / "c.yaml").write_text(_VALID_YAML)
    cfg = config.from_dict(config.load_file(tmp_path / "c.yaml"))
    assert (cfg.defense.ci.tau, cfg.train.lr, cfg.attack.pixel.clip) == (0.5, 1e-3, True)


@FUZZ
@given(st.sampled_from([".json", ".yaml", ".yml"]),
       st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
       | st.builds(lambda i, b: _VALID_YAML.encode()[:i] + b, st.integers(0, len(_VALID_YAML)),
                   st.binary(max_size=8)))
def test_fuzz_load_file_gives_a_dict_or_one_user_error(fuzz_dir, suffix, raw):
    path = fuzz_dir / f"cfg{suffix}"
    path.write_bytes(raw)
    _load_and_build(path)


# -- help texts ----------------------------------------------------------------------------------


def test_help_names_each_preset_that_changes_a_default():
    paths = config.PATHS
    assert settings_lib.help_text(paths["train.epochs"], config.PRESETS).endswith(
        "(from 1 to 100000; default: 1 (preset cifar: 200, fashion: 6, fast: 2, paper: 100, seed: 10))")
    assert settings_lib.help_text(paths["defense.ci.filters"], config.PRESETS).endswith(
        "default: median3 (preset paper: mean2, seed: mean2))")
    assert settings_lib.help_text(paths["train.nesterov"], config.PRESETS).endswith("(default: false)")
    # "seed" sets momentum to its default: no preset differs, none is named.
    assert settings_lib.help_text(paths["train.momentum"], config.PRESETS).endswith(
        "(from 0.0 to 1.0; default: 0.9)")


def test_every_preset_value_is_in_the_help():
    for name, preset in config.PRESETS.items():
        for path, value in preset.items():
            text = settings_lib.help_text(config.PATHS[path], config.PRESETS)
            if value != config.PATHS[path].default:
                assert f"{name}: " in text.rsplit("default: ", 1)[1], (name, path)


def test_a_value_a_help_text_explains_is_one_the_field_accepts():
    # SPECTRE's alpha said "0: spectral signatures" and refused 0.
    explained = 0
    for leaf in config.PATHS.values():
        if leaf.kind not in (int, float):
            continue
        for number in re.findall(r"(?:^|[(;,] ?)(-?\d+(?:\.\d+)?): ", leaf.meta["help"]):
            explained += 1
            settings_lib.check_value(leaf, leaf.kind(float(number)))  # raises if out of range
    assert explained >= 2  # attack.source -1, train.momentum 0


def test_spectre_alpha_spans_the_squared_norm_to_spectral_signatures():
    # What the help says of QUE's alpha: near 0 every whitened direction weighs alike, large alpha
    # keeps only the top one (the spectral-signatures score).
    import numpy as np

    from ci_jax.defenses import spectre

    h = np.random.default_rng(0).normal(size=(400, 5)) * np.array([3.0, 1.0, 1.0, 0.8, 0.5])
    lam, v = np.linalg.eigh(np.cov(h, rowvar=False))
    near0, _ = spectre._que(h, 1e-9)
    assert np.allclose(near0, (h ** 2).sum(1) / 5)
    large, _ = spectre._que(h, 100.0)
    assert np.allclose(large, (h @ v[:, -1]) ** 2, rtol=1e-6, atol=1e-9)
    assert "spectral signatures" in spectre.Settings.__dataclass_fields__["alpha"].metadata["help"].split("large")[1]
