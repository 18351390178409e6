"""IBD-PSC on a hand-built model whose answer is known. Its content path is three BatchNorm layers,
z = bn3(bn2(bn1(a))) with each bn(u) = u + 0.3, and the logits are [2 - z, 20 t, z]: a clean image
(a = 0, t = 0) has z = 0.9 and is class 0, but scaling a layer's gamma and beta by 1.5 pushes z past
1 (class 2); a trigger (t = 1) decides class 1 by a margin no scaling touches."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ci_jax import config, defenses, models
from ci_jax.defenses.base import Reserve, View
from ci_jax.errors import UserError
from ci_jax.perturbations import bn_scale


class ThreeBN(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.bns = nnx.List([nnx.BatchNorm(1, use_running_average=True, epsilon=0.0, rngs=rngs) for _ in range(3)])
        for bn in self.bns:
            bn.bias[...] = jnp.full((1,), 0.3)

    def __call__(self, x_BHWC):
        z = x_BHWC[..., 0].mean((1, 2))[:, None]
        for bn in self.bns:
            z = bn(z)
        t = x_BHWC[:, 0, 0, 1]
        logits = jnp.stack([2.0 - z[:, 0], 20.0 * t, z[:, 0]], 1)
        return logits, jnp.concatenate([z, t[:, None]], 1)


def _view(n_clean=12, n_poison=4):
    model = ThreeBN()
    model.layer_order = models.assignment_order(model)
    gd, st = nnx.split(model)

    def predict(x_NHWC, transform=None, desc=None, logits=False, model=None):
        state = model(gd, st) if model is not None else st
        out, feats = nnx.merge(gd, state)(jnp.asarray(x_NHWC))
        pred = np.asarray(jnp.argmax(out, -1), np.int32)
        return (pred, np.asarray(feats), np.asarray(out))[:3 if logits else 2]

    x = np.zeros((n_clean + n_poison, 2, 2, 2), np.float32)
    x[n_clean:, 0, 0, 1] = 1.0
    pred, feats = predict(x)
    rx = np.zeros((20, 2, 2, 2), np.float32)
    reserve = Reserve(rx, np.zeros(20, np.int64), np.zeros((20, 2)), predict(rx)[0], np.arange(20), key="r20")
    return View(x_NHWC=x, y_N=pred.astype(np.int64), feats_ND=feats, pred_N=pred, num_classes=3, predict=predict,
                seed=0, reserve=reserve, is_poison_N=np.arange(len(x)) >= n_clean,
                bn_layers=bn_scale.count_layers(gd, st))


def _run(view, **fields):
    cfg = config.replace(config.Config(), {"defense.name": "ibd_psc", "eval.reserve": 20,
                                           **{f"defense.ibd_psc.{k}": v for k, v in fields.items()}})
    return defenses.build("ibd_psc", cfg.defense_settings()).run(view)


def _softmax(logits):
    e = np.exp(np.asarray(logits, np.float64) - np.max(logits))
    return e / e.sum()


def _z(scaled_layers):
    """z of a clean image with the last `scaled_layers` of 3 layers at 1.5: u -> 1.5 u + 0.45 there."""
    z = 0.0
    for i in range(3):
        z = 1.5 * z + 0.45 if i >= 3 - scaled_layers else z + 0.3
    return z


def test_psc_by_hand():
    view = _view()
    assert view.bn_layers == 3 and view.pred_N.tolist() == [0] * 12 + [1] * 4
    res = _run(view, n=2)
    # Selection: one scaled layer gives z = 0.6 * 1.5 + 0.45 = 1.35 > 1: every clean decision flips, error 1 > 0.6.
    sel = res.report["layer_selection"]
    assert sel == {"clean_error": {"1": 1.0}, "xi": 0.6, "start": 1, "reached_xi": True}
    assert res.report["models_scale_last"] == [2, 3]
    assert _z(2) == pytest.approx(1.8) and _z(3) == pytest.approx(2.1375)
    clean = np.mean([_softmax([2 - _z(k), 0.0, _z(k)])[0] for k in (2, 3)])
    poison = np.mean([_softmax([2 - _z(k), 20.0, _z(k)])[1] for k in (2, 3)])
    np.testing.assert_allclose(res.score_N, [clean] * 12 + [poison] * 4, rtol=1e-5)
    assert clean < 0.2 and poison > 0.999
    assert (~res.is_clean_N).tolist() == [False] * 12 + [True] * 4  # PSC >= 0.9
    assert res.report["clean_psc_mean"] == pytest.approx(clean, rel=1e-5)


def test_models_past_the_last_layer_scale_them_all():
    res = _run(_view(), n=4)
    assert res.report["models_scale_last"] == [2, 3, 3, 3]
    clean = (_softmax([2 - _z(2), 0, _z(2)])[0] + 3 * _softmax([2 - _z(3), 0, _z(3)])[0]) / 4
    np.testing.assert_allclose(res.score_N[0], clean, rtol=1e-5)


def test_when_no_layer_count_reaches_xi_the_deepest_scalings_are_used():
    res = _run(_view(), n=1, xi=1.0)  # an error above 1 is never reached
    sel = res.report["layer_selection"]
    assert sel["reached_xi"] is False and sel["clean_error"] == {"1": 1.0, "2": 1.0} and sel["start"] == 2
    assert res.report["models_scale_last"] == [3]


def test_the_frr_cut_and_a_model_without_batchnorm():
    res = _run(_view(), n=2, cut="frr", frr=0.05)
    assert (~res.is_clean_N).sum() == 4 and res.report["clean_flagged_share"] == 0.0
    view = _view()
    view.bn_layers = 0
    with pytest.raises(UserError, match="has no BatchNorm"):
        _run(view)
