"""Full-covariance Gaussian mixtures fitted on the device: every class at once, by EM in JAX.

The same model and search as `gmm` (scikit-learn's GaussianMixture with k-means initialisation,
reg_covar on the covariances' diagonal, BIC over k = 1, 2, ...), batched over the classes: each
class's features are padded to one length with zero weights, and one jitted program fits a given
k for every class. The BIC search runs k upwards over the batch (`sweep` to k_max, `ascent` until
every class has failed to improve twice), so the host only picks k.

Initialisation as scikit-learn's: greedy k-means++ seeds (2 + log k candidates per centre, the
one that lowers the potential most kept), then Lloyd steps until the centres move less than
scikit-learn's tolerance (1e-4 x the mean feature variance) or LLOYD_MAX_STEPS, then EM from the
hard k-means assignment. Differences, measured in the tests: float32 instead of float64, and
JAX's random numbers; log-likelihoods and BICs agree to a small relative tolerance on planted
mixtures, and the chosen k agrees there. On real features, whose BIC curves are flat near their
minimum, either backend's chosen k also moves with its seed (experiments/results/README.md).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ci_jax.defenses.gmm import Search

LLOYD_MAX_STEPS = 300  # scikit-learn's KMeans max_iter
LLOYD_TOL = 1e-4  # scikit-learn's KMeans tol, relative to the mean feature variance
EM_TOL = 1e-3  # scikit-learn's: change of the mean log-likelihood per sample
EM_MAX_ITER = 100


def _kmeans_pp(x_ND: jax.Array, w_N: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """Greedy k-means++ seeds, as scikit-learn's: each next centre is the best of 2 + log k
    candidates drawn with probability proportional to the squared distance to the nearest centre
    so far, the one whose potential (weighted sum of those distances) is lowest (padded rows have
    weight 0)."""
    trials = 2 + int(math.log(k))
    key, sub = jax.random.split(key)
    first = jax.random.categorical(sub, jnp.log(w_N + 1e-30))
    centres = jnp.zeros((k, x_ND.shape[1]), x_ND.dtype).at[0].set(x_ND[first])
    d2 = jnp.sum((x_ND - x_ND[first]) ** 2, -1)

    def body(i, carry):
        centres, d2, key = carry
        key, sub = jax.random.split(key)
        cand_T = jax.random.categorical(sub, jnp.log(w_N * d2 + 1e-30), shape=(trials,))
        d2_TN = jnp.minimum(d2[None], jnp.sum((x_ND[None] - x_ND[cand_T][:, None]) ** 2, -1))
        best = jnp.argmin(d2_TN @ w_N)
        return centres.at[i].set(x_ND[cand_T[best]]), d2_TN[best], key

    centres, _, _ = jax.lax.fori_loop(1, k, body, (centres, d2, key))
    return centres


def _lloyd(x_ND: jax.Array, w_N: jax.Array, centres_KD: jax.Array) -> jax.Array:
    """Hard k-means labels once the centres have settled (an empty cluster keeps its centre)."""
    n = w_N.sum()
    mean_D = w_N @ x_ND / n
    tol = LLOYD_TOL * jnp.mean(w_N @ (x_ND - mean_D) ** 2 / n)

    def step(carry):
        i, centres, _ = carry
        d2 = jnp.sum((x_ND[:, None] - centres[None]) ** 2, -1)
        onehot = jax.nn.one_hot(jnp.argmin(d2, -1), centres.shape[0]) * w_N[:, None]
        size = onehot.sum(0)
        new = jnp.where(size[:, None] > 0, onehot.T @ x_ND / jnp.maximum(size, 1)[:, None], centres)
        return i + 1, new, jnp.sum((new - centres) ** 2)

    _, centres, _ = jax.lax.while_loop(lambda c: (c[0] < LLOYD_MAX_STEPS) & (c[2] > tol), step,
                                       (0, centres_KD, jnp.inf))
    d2 = jnp.sum((x_ND[:, None] - centres[None]) ** 2, -1)
    return jax.nn.one_hot(jnp.argmin(d2, -1), centres.shape[0])


def _m_step(x_ND, w_N, resp_NK, reg: float):
    """Weights, means and covariances (as matrix products: x is centred per class)."""
    resp = resp_NK * w_N[:, None]
    nk = resp.sum(0) + 10 * jnp.finfo(x_ND.dtype).eps
    means = resp.T @ x_ND / nk[:, None]
    second = jnp.einsum("nk,nd,ne->kde", resp, x_ND, x_ND) / nk[:, None, None]
    cov = second - means[:, :, None] * means[:, None, :] + reg * jnp.eye(x_ND.shape[1], dtype=x_ND.dtype)
    return nk / w_N.sum(), means, cov


def _log_prob(x_ND, weights_K, means_KD, cov_KDD):
    """(N, K) log of weight x density, through the inverse Cholesky factors (matrix products)."""
    chol = jnp.linalg.cholesky(cov_KDD)
    eye = jnp.broadcast_to(jnp.eye(x_ND.shape[1], dtype=x_ND.dtype), cov_KDD.shape)
    inv = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)  # L^-1: maha = |L^-1 (x - mu)|^2
    proj = jnp.einsum("nd,ked->nke", x_ND, inv) - jnp.einsum("kd,ked->ke", means_KD, inv)[None]
    maha = jnp.sum(proj ** 2, -1)  # (N, K)
    logdet = 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=1, axis2=2)), -1)
    d = x_ND.shape[1]
    return jnp.log(weights_K)[None] - 0.5 * (d * math.log(2 * math.pi) + logdet[None] + maha)


@functools.partial(jax.jit, static_argnums=(4, 6))
def fit_batch(x_CND: jax.Array, w_CN: jax.Array, keys_C: jax.Array, active_C: jax.Array, k: int,
              reg: float, batched: bool) -> dict[str, jax.Array]:
    """EM for a k-component full-covariance mixture of each active class (batched over C); returns
    the mean log-likelihood per sample, BIC, EM steps and the hard assignment of each row, per
    class (zeros for inactive classes, which cost nothing on a CPU)."""
    def one(x_ND, w_N, key):
        resp = _lloyd(x_ND, w_N, _kmeans_pp(x_ND, w_N, k, key))
        params = _m_step(x_ND, w_N, resp, reg)
        n = w_N.sum()

        def mean_ll(lp):
            return jnp.sum(jax.nn.logsumexp(lp, -1) * w_N) / n

        def cond(carry):
            i, _, prev, cur = carry
            return (i < EM_MAX_ITER) & (jnp.abs(cur - prev) >= EM_TOL)

        def body(carry):
            i, lp, _, cur = carry
            params = _m_step(x_ND, w_N, jnp.exp(lp - jax.nn.logsumexp(lp, -1, keepdims=True)), reg)
            lp = _log_prob(x_ND, *params)
            return i + 1, lp, cur, mean_ll(lp)

        lp0 = _log_prob(x_ND, *params)
        iters, lp, _, ll = jax.lax.while_loop(cond, body, (0, lp0, -jnp.inf, mean_ll(lp0)))
        d = x_ND.shape[1]
        n_params = k * (d + d * (d + 1) / 2) + k - 1
        bic = -2 * ll * n + n_params * jnp.log(n)
        return {"ll": ll.astype(jnp.float32), "bic": bic.astype(jnp.float32),
                "comp": jnp.argmax(lp, -1).astype(jnp.int32), "iters": iters.astype(jnp.int32)}

    if not batched:
        def maybe(a):
            x_ND, w_N, key, on = a
            skip = {"ll": jnp.float32(0), "bic": jnp.float32(jnp.inf), "comp": jnp.zeros(x_ND.shape[0], jnp.int32),
                    "iters": jnp.int32(0)}
            return jax.lax.cond(on, lambda: one(x_ND, w_N, key), lambda: skip)
        return jax.lax.map(maybe, (x_CND, w_CN, keys_C, active_C))
    return jax.vmap(one)(x_CND, w_CN, keys_C)


def _padded(feats_ND: np.ndarray, y_N: np.ndarray, labels: list[int]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    idx = [np.flatnonzero(y_N == c) for c in labels]
    n_max = max(len(i) for i in idx)
    x = np.zeros((len(labels), n_max, feats_ND.shape[1]), np.float32)
    w = np.zeros((len(labels), n_max), np.float32)
    for j, i in enumerate(idx):
        x[j, :len(i)] = feats_ND[i]
        w[j, :len(i)] = 1.0
    return x, w, idx


def cluster(feats_ND: np.ndarray, y_N: np.ndarray, s: Search) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """As gmm.cluster (same output), every class fitted at once on the device."""
    if s.covariance != "full":
        raise ValueError("the JAX mixtures fit full covariances only")  # config checks this first
    labels = [int(c) for c in np.unique(y_N)]
    x, w, idx = _padded(feats_ND, y_N, labels)
    # Centred per class: the covariances come from second moments, which float32 keeps only for
    # data near its mean. A shift changes neither the likelihood nor the assignments.
    x -= (x * w[..., None]).sum(1, keepdims=True) / w.sum(1)[:, None, None]
    x *= w[..., None]
    x_dev, w_dev = jnp.asarray(x), jnp.asarray(w)
    keys = jax.random.split(jax.random.key(s.seed), len(labels))
    sizes = np.array([len(i) for i in idx])
    best_bic = np.full(len(labels), np.inf)
    best_comp = [np.zeros(len(i), np.int64) for i in idx]
    best_k = np.ones(len(labels), int)
    bics: list[list[float]] = [[] for _ in labels]
    fails = np.zeros(len(labels), int)
    active = np.ones(len(labels), bool)
    for k in range(1, s.k_max + 1):
        active &= sizes > k  # no more components than images, as for scikit-learn's fit
        if not active.any():
            break
        out = jax.device_get(fit_batch(x_dev, w_dev, keys, jnp.asarray(active), k, s.reg_covar, jax.default_backend() != "cpu"))
        for j in np.flatnonzero(active):
            bic = float(out["bic"][j])
            if not math.isfinite(bic):
                active[j] = False
                continue
            bics[j].append(bic)
            if bic < best_bic[j]:
                best_bic[j], best_k[j], fails[j] = bic, k, 0
                best_comp[j] = np.asarray(out["comp"][j][:sizes[j]], np.int64)
            else:
                fails[j] += 1
                if s.bic_search == "ascent" and fails[j] == 2:
                    active[j] = False
    comp_N = np.full(len(y_N), -1, np.int64)
    classes, offset = [], 0
    for j, c in enumerate(labels):
        # Components that ended up empty are dropped, so that k counts the components in use.
        used, comp = np.unique(best_comp[j], return_inverse=True)
        comp_N[idx[j]] = offset + comp
        entry = {"label": c, "k": int(len(used)), "bic": bics[j], "offset": offset}
        if len(used) < best_k[j]:
            entry["note"] = f"BIC chose k={best_k[j]}; {best_k[j] - len(used)} component(s) took no image"
        classes.append(entry)
        offset += len(used)
    return comp_N, classes
