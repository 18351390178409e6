"""The registry, entries, and the severity ladder: each strength its own cached pass."""

import jax.numpy as jnp
import numpy as np
import pytest

from ci_jax import config, perturbations
from ci_jax.defenses.base import View
from ci_jax.errors import UserError
from ci_jax.perturbations.base import Applied, Perturbation


def _view(tmp_path, calls):
    x = np.linspace(0, 1, 8 * 4, dtype=np.float32).reshape(8, 2, 2, 1)

    def predict(x_NHWC, transform=None, desc=None, logits=False, model=None):
        calls.append((desc, model is not None))
        out = np.asarray(transform(jnp.asarray(x_NHWC))) if transform is not None else x_NHWC
        pred = (out.mean((1, 2, 3)) > 0.5).astype(np.int32)
        return (pred, np.zeros((len(pred), 1)), np.stack([1.0 - pred, pred], 1).astype(np.float32))[:3 if logits else 2]

    return View(x_NHWC=x, y_N=np.zeros(8, np.int64), feats_ND=np.zeros((8, 1)), pred_N=np.zeros(8, np.int32),
                num_classes=2, predict=predict, seed=0, cache_dir=tmp_path, key="baseline")


def test_each_strength_is_its_own_cached_pass(tmp_path):
    calls = []
    view = _view(tmp_path, calls)
    ladder = perturbations.ladder("amplify", [1, 2, 4])
    assert [a.name for a in ladder] == ["amplify(factor=1.0)", "amplify(factor=2.0)", "amplify(factor=4.0)"]
    preds = [view.train_pass(a.name, a.transform) for a in ladder]
    assert [p.sum() for p in preds] == [4, 6, 7]  # amplifying pushes more mean intensities past 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "pass-amplify_factor=1.0_.npz", "pass-amplify_factor=2.0_.npz", "pass-amplify_factor=4.0_.npz"]
    again = _view(tmp_path, calls)
    for a, p in zip(ladder, preds):
        np.testing.assert_array_equal(again.train_pass(a.name, a.transform), p)
    assert len(calls) == 3  # read back, not computed again


def test_model_passes_and_logits_are_kept_apart(tmp_path):
    calls = []
    view = _view(tmp_path, calls)
    names = [a.name for a in perturbations.ladder("bn_scale", [1.5, 2.0], layers=3)]
    assert names == ["bn_scale(factor=1.5,layers=3)", "bn_scale(factor=2.0,layers=3)"]
    a = perturbations.ladder("bn_scale", [1.5], layers=3)[0]
    view.train_pass(a.name, model=a.model)
    view.train_pass(a.name, model=a.model, logits=True)
    assert calls == [(a.name, True), (a.name, True)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logits-bn_scale_factor=1.5_layers=3_.npz",
                                                          "pass-bn_scale_factor=1.5_layers=3_.npz"]


def test_unknown_names_offer_the_nearest():
    with pytest.raises(UserError, match="unknown perturbation 'ampliffy': did you mean 'amplify'"):
        perturbations.get("ampliffy")
    with pytest.raises(UserError, match="did you mean 'median3'"):
        config.replace(config.Config(), {"defense.ci.filters": ["mediam3@2"]})
    with pytest.raises(UserError, match="ladder|takes no strength"):
        perturbations.ladder("median3", [1])


def test_names_kinds_and_strengths():
    assert tuple(perturbations.NAMES) == ("mean2", "mean3", "median3", "gaussian", "noise", "quant", "amplify", "warp",
                                          "bn_scale", "dropout")
    assert {n for n in perturbations.NAMES if perturbations.get(n).kind == "model"} == {"bn_scale", "dropout"}
    assert "quant@2" in perturbations.ENTRIES and "blur@2" not in perturbations.ENTRIES and 3 not in perturbations.ENTRIES


def test_a_registered_perturbation_is_accepted_by_ci_and_names_its_pass():
    class Invert(Perturbation):
        name = "invert_test"

        def make(self, s, seed):
            return Applied(self.describe(s), lambda x: 1.0 - x)

    perturbations.register(Invert())
    try:
        cfg = config.replace(config.Config(), {"defense.ci.filters": ["invert_test", "quant@2"]})
        assert [a.name for a in cfg.defense.ci.passes(0)] == ["invert_test", "quant(levels=2)"]
    finally:
        perturbations.unregister("invert_test")
    with pytest.raises(UserError, match="unknown defense.ci.filters entry 'invert_test'"):
        config.replace(config.Config(), {"defense.ci.filters": ["invert_test"]})
