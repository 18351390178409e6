"""Config: presets, validation of every field (types, ranges, names), round trip, fingerprint."""

import dataclasses

import pytest

from ci_jax import config, poison
from ci_jax.config import Config
from ci_jax.errors import UserError


# --- presets -----------------------------------------------------------------------------------


def test_presets_exist_and_validate():
    assert {"default", "seed", "fast"} <= set(config.PRESETS)
    for name in ("default", "seed", "fast"):
        cfg = config.preset(name)
        assert isinstance(cfg, Config)
        config.validate(cfg)  # no exception


def test_default_preset_is_the_seed_attack_with_the_threshold_rule():
    cfg = config.preset("default")
    assert (cfg.model, cfg.source, cfg.target, cfg.n_poison, cfg.amplitude) == ("resnet20", 0, 2, 1000, 0.25)
    assert (cfg.trigger_row, cfg.trigger_col, cfg.clip) == (18, 24, False)
    assert (cfg.rule, cfg.tau, cfg.bic_search) == ("threshold", 0.5, "ascent")


def test_seed_preset_has_the_notebook_settings():
    cfg = config.preset("seed")
    assert cfg.model == "resnet20"
    assert cfg.batch_size == 32
    assert cfg.optimizer == "sgd"
    assert cfg.lr == 0.01
    assert cfg.momentum == 0.9
    assert cfg.epochs == 10
    assert cfg.bic_search == "sweep"
    assert cfg.k_max == 10
    assert cfg.rule == "top1"


def test_fast_preset_uses_the_small_cnn():
    assert config.preset("fast").model == "cnn"


def test_preset_overrides_are_applied_and_validated():
    cfg = config.preset("seed", tau=0.25, k_max=4)
    assert (cfg.tau, cfg.k_max, cfg.rule) == (0.25, 4, "top1")
    with pytest.raises(UserError, match="k_max"):
        config.preset("seed", k_max=0)


def test_unknown_preset_is_a_user_error_listing_the_presets():
    with pytest.raises(UserError, match="nope") as e:
        config.preset("nope")
    for name in ("default", "seed", "fast"):
        assert name in str(e.value)


# --- unknown fields and types ------------------------------------------------------------------


def test_unknown_field_is_a_user_error_naming_it():
    with pytest.raises(UserError, match="n_poisons"):
        config.replace(Config(), n_poisons=10)
    with pytest.raises(UserError, match="bogus_field"):
        config.preset("default", bogus_field=1)


def test_user_error_is_a_value_error():
    # The CLI catches UserError; callers that only know ValueError still catch it too.
    assert issubclass(UserError, ValueError)


@pytest.mark.parametrize("field, value", [
    ("k_max", "3"),          # str for int
    ("epochs", 1.5),         # float for int
    ("batch_size", True),    # bool for int
    ("n_poison", 10.0),      # a whole float is still not an int
    ("seed", None),
    ("tau", "0.5"),          # str for float
    ("amplitude", False),    # bool for float
    ("clip", 1),             # int for bool
    ("nesterov", "yes"),
    ("dataset", 3),          # int for str
    ("filter", None),
])
def test_wrong_type_is_a_user_error_naming_the_field(field, value):
    with pytest.raises(UserError, match=rf"\b{field}\b"):
        config.replace(Config(), **{field: value})


@pytest.mark.parametrize("field, value", [("tau", 1), ("amplitude", 1), ("lr", 1)])
def test_int_is_accepted_for_a_float_field(field, value):
    assert getattr(config.replace(Config(), **{field: value}), field) == value


@pytest.mark.parametrize("field, value", [
    ("amplitude", float("nan")), ("tau", float("inf")), ("lr", float("-inf"))])
def test_non_finite_float_is_a_user_error_naming_the_field(field, value):
    with pytest.raises(UserError, match=field):
        config.replace(Config(), **{field: value})


# --- ranges ------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("amplitude", -0.25),
    ("amplitude", 0.0),
    ("k_max", 0),
    ("k_max", -1),
    ("tau", -0.1),
    ("batch_size", 0),
    ("eval_batch_size", 0),
    ("epochs", 0),
    ("n_poison", -1),
    ("lr", 0.0),
    ("reg_covar", 0.0),
    ("weight_decay", -1e-4),
    ("momentum", -0.5),
    ("filter_param", -1.0),
])
def test_out_of_range_is_a_user_error_naming_the_field(field, value):
    with pytest.raises(UserError, match=rf"\b{field}\b"):
        config.replace(Config(), **{field: value})


@pytest.mark.parametrize("field, value", [
    ("n_poison", 0), ("tau", 0.0), ("k_max", 1), ("weight_decay", 0.0), ("momentum", 0.0),
    ("filter_param", 0.0)])
def test_range_boundaries_that_are_allowed(field, value):
    assert getattr(config.replace(Config(), **{field: value}), field) == value


# --- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, choices", [
    ("model", "vgg16", ("resnet20", "cnn")),
    ("dataset", "svhn", ("mnist", "fashion_mnist", "cifar10")),
    ("filter", "blur", config.FILTERS),
    ("rule", "top2", config.RULES),
    ("bic_search", "grid", config.BIC_SEARCHES),
    ("covariance", "banded", config.COVARIANCES),
    ("optimizer", "rmsprop", config.OPTIMIZERS),
    ("schedule", "step", config.SCHEDULES),
    ("selection", "last", config.SELECTIONS),
    ("trigger", "sticker", poison.TRIGGERS),
])
def test_unknown_name_is_a_user_error_listing_the_choices(field, value, choices):
    with pytest.raises(UserError) as e:
        config.replace(Config(), **{field: value})
    msg = str(e.value)
    assert repr(value) in msg
    for choice in choices:
        assert choice in msg


@pytest.mark.parametrize("name", config.FILTERS)
def test_every_filter_is_accepted(name):
    assert config.replace(Config(), filter=name).filter == name


def test_source_equal_to_target_is_a_user_error():
    with pytest.raises(UserError, match="source and target"):
        config.replace(Config(), source=3, target=3)
    with pytest.raises(UserError, match="source and target"):
        config.replace(Config(), target=Config().source)


def test_validate_rejects_a_config_built_directly():
    # dataclasses.replace skips validation; config.validate still catches the bad value.
    bad = dataclasses.replace(Config(), k_max=0)
    with pytest.raises(UserError, match="k_max"):
        config.validate(bad)


# --- serialization -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "seed", "fast"])
def test_to_dict_from_dict_round_trip(name):
    cfg = config.preset(name, tau=0.3, filter="gaussian", filter_param=1.5, clip=True)
    d = config.to_dict(cfg)
    assert isinstance(d, dict)
    assert set(d) == {f.name for f in dataclasses.fields(Config)}
    assert config.from_dict(d) == cfg


def test_to_dict_is_json_serializable_and_round_trips_through_json():
    import json

    cfg = config.preset("seed", n_poison=7)
    assert config.from_dict(json.loads(json.dumps(config.to_dict(cfg)))) == cfg


def test_from_dict_validates():
    with pytest.raises(UserError, match="unknown_key"):
        config.from_dict({"unknown_key": 1})
    with pytest.raises(UserError, match="tau"):
        config.from_dict({"tau": -1.0})


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().tau = 0.1  # type: ignore[misc]


# --- fingerprint -------------------------------------------------------------------------------


def _fp(cfg):
    return config.fingerprint(cfg, config.TRAIN_FIELDS)


def test_train_fields_are_config_fields_and_exclude_the_defense():
    names = {f.name for f in dataclasses.fields(Config)}
    assert set(config.TRAIN_FIELDS) <= names
    for defense_field in ("filter", "filter_param", "tau", "rule", "k_max", "bic_search",
                          "covariance", "reg_covar", "eval_batch_size"):
        assert defense_field not in config.TRAIN_FIELDS


def test_fingerprint_is_stable_short_hex():
    fp = _fp(Config())
    assert fp == _fp(Config()) == _fp(config.preset("default"))
    assert len(fp) == 16
    int(fp, 16)


def test_fingerprint_ignores_defense_fields():
    base = Config()
    changed = config.replace(base, filter="median3", tau=2.0, rule="top1", k_max=3,
                             bic_search="sweep", covariance="diag", reg_covar=1e-4,
                             filter_param=0.5, eval_batch_size=64)
    assert _fp(changed) == _fp(base)


@pytest.mark.parametrize("field, value", [
    ("lr", 0.01), ("seed", 1), ("n_poison", 500), ("epochs", 2), ("model", "cnn"),
    ("trigger_row", 3), ("amplitude", 0.5), ("source", 1), ("batch_size", 64)])
def test_fingerprint_changes_with_training_fields(field, value):
    base = Config()
    assert getattr(base, field) != value
    assert _fp(config.replace(base, **{field: value})) != _fp(base)


def test_fingerprint_depends_only_on_the_given_fields():
    a, b = Config(), config.replace(Config(), seed=1)
    assert config.fingerprint(a, ("tau",)) == config.fingerprint(b, ("tau",))
    assert config.fingerprint(a, ("seed",)) != config.fingerprint(b, ("seed",))


def test_fingerprint_same_for_int_and_float_spelling_of_a_float_field():
    a = config.replace(Config(), amplitude=1)      # e.g. {"amplitude": 1} in --config
    b = config.replace(Config(), amplitude=1.0)    # e.g. --amplitude 1
    assert a == b
    assert _fp(a) == _fp(b)
