"""Many models of one architecture trained, and run, as one program: the model and optimizer states
stacked on a leading axis and the step vmapped over it, so that a batch of ablations fills an
accelerator.

Each member keeps its own seed (initialisation and data order), its own training set (indices
into one shared image array, so baselines of different attacks and retrains after different
removals share a step), its own learning-rate schedule (a table per member, injected into its
optimizer), and its own checkpoint directory, written as `checkpoint` writes every model: every member
resumes and is reused on its own by the usual keys and rules. Members with fewer steps per epoch
take no-op steps while the others finish theirs.

What must be the same across a stack: the architecture, the optimizer and its hyperparameters but
the learning rate, the batch size and the number of epochs (`stack_key`).

`train_runs` is what a sweep calls: every model its runs need (their baselines, the baselines'
passes, then what each run retrains after its defense), stacked; the runs then find them finished.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ci_jax import augment, cache, checkpoint, data, experiment, faults, files, train
from ci_jax.errors import UserError


# The train fields in which members of one stack may differ: each member's learning rate reaches its
# optimizer from a table of its own (`train.lr_table`), whatever schedule made it.
MAY_DIFFER = frozenset({"lr", "schedule"})


def stack_key(cfg) -> tuple:
    """Members of one stack agree on this: every train field but MAY_DIFFER (so a new field keeps
    models that differ in it apart), and the pass batch. The seed and the data may differ too."""
    t = cfg.train
    return tuple((f.name, getattr(t, f.name)) for f in dataclasses.fields(t) if f.name not in MAY_DIFFER) \
        + (("eval.batch_size", cfg.eval.batch_size),)


@dataclasses.dataclass
class Member:
    """One model of a stack: its config, training set (indices into the shared images), where its
    checkpoints go and what identifies it."""

    cfg: Any
    idx_N: np.ndarray
    ckpt_dir: Path
    key: str
    desc: str = "train"


def _select(active, new, old):
    return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)


class Stack:
    """K models trained together on one shared image array."""

    def __init__(self, members: list[Member], image_shape: tuple[int, int, int], num_classes: int):
        if len({stack_key(m.cfg) for m in members}) != 1:
            raise ValueError("members of a stack must share stack_key(cfg)")  # the caller groups them
        self.members = members
        b = members[0].cfg.train.batch_size
        self.steps_K = np.array([train.steps_per_epoch(len(m.idx_N), b) for m in members])
        self.trainers = [train.Trainer(m.cfg, image_shape, num_classes, int(s)) for m, s in zip(members, self.steps_K)]
        t0 = self.trainers[0]
        self.replicated, self.train_def, self.eval_def = t0.replicated, t0.train_def, t0.eval_def
        if len({t.augment for t in self.trainers}) != 1:
            raise ValueError("members of a stack must augment alike")  # one dataset per stack
        self.augment, self.seeds_K = t0.augment, jnp.array([m.cfg.seed for m in members], jnp.uint32)
        self.epochs = members[0].cfg.train.epochs
        total = int(self.steps_K.max()) * self.epochs
        self.lr_KS = jnp.stack([jnp.pad(t.lr_S, (0, total - t.lr_S.shape[0])) for t in self.trainers])
        self.train_step = jax.jit(self._stacked_step, donate_argnums=0)

    # -- state ----------------------------------------------------------------------------------
    def stacked_state(self):
        return jax.tree.map(lambda *a: jnp.stack(a), *[t.state for t in self.trainers])

    def unstack_into_trainers(self, state) -> None:
        for k, t in enumerate(self.trainers):
            t.state = jax.device_put(jax.tree.map(lambda a: a[k], state), self.replicated)

    # -- jitted bodies --------------------------------------------------------------------------
    def _one(self, state, x_NHWC, y_N, idx_SB, i, steps, lr_S, epoch, seed):
        active = i < steps
        idx_B = idx_SB[jnp.minimum(i, idx_SB.shape[0] - 1)]
        # Each member's own draws, those it makes when trained alone (same seed and global step).
        x_BHWC = augment.apply(self.augment, x_NHWC[idx_B], seed, epoch * steps + i)
        # A copy goes in: merging a state into modules and updating them rewrites the state's own
        # containers, and the no-op branch needs the old values.
        new, loss = train.update(self.train_def, jax.tree.map(lambda a: a, state), x_BHWC, y_N[idx_B],
                                 lr_S[epoch * steps + i])
        return _select(active, new, state), jnp.where(active, loss, 0.0)

    def _stacked_step(self, state_K, x_NHWC, y_N, idx_KSB, i, steps_K, lr_KS, epoch):
        return jax.vmap(self._one, in_axes=(0, None, None, 0, None, 0, 0, None, 0))(
            state_K, x_NHWC, y_N, idx_KSB, i, steps_K, lr_KS, epoch, self.seeds_K)

    # -- training -------------------------------------------------------------------------------
    def epoch_indices(self, epoch: int) -> jax.Array:
        """(K, S_max, B) global indices: each member's own permutation of its own set, padded."""
        b = self.members[0].cfg.train.batch_size
        s_max = int(self.steps_K.max())
        out = []
        for m in self.members:
            local = np.asarray(train.epoch_indices(m.cfg.seed, len(m.idx_N), b, epoch))
            glob = m.idx_N[local]
            out.append(np.pad(glob, ((0, s_max - len(glob)), (0, 0)), mode="edge"))
        return jnp.asarray(np.stack(out))

    def fit(self, x_NHWC: jax.Array, y_N: jax.Array, start_epoch: int, logs: list[train.Log], mngrs) -> list[float]:
        """Trains every member from start_epoch to the end, saving each one's checkpoint per epoch."""
        state = self.stacked_state()
        steps_K = jnp.asarray(self.steps_K)
        s_max = int(self.steps_K.max())
        ends = {int(s) for s in self.steps_K}
        b = self.members[0].cfg.train.batch_size
        means = []
        for epoch in range(start_epoch, self.epochs):
            idx = self.epoch_indices(epoch)
            losses, t0, marks = [], time.perf_counter(), [0] * len(self.members)
            desc = f"stack of {len(self.members)} epoch {epoch + 1}/{self.epochs}"
            with tqdm(total=s_max, desc=desc, unit="step", leave=False, mininterval=1.0) as bar:
                for i in range(s_max):
                    state, loss_K = self.train_step(state, x_NHWC, y_N, idx, i, steps_K, self.lr_KS, epoch)
                    losses.append(loss_K)
                    train.throttle(losses)
                    # Every LOG_EVERY steps and at each member's last step (members end apart).
                    if (i + 1) % train.LOG_EVERY == 0 or i + 1 in ends:
                        base = min(marks)
                        window_WK = np.asarray(jnp.stack(losses[base:]))  # steps base..i
                        rate = (i + 1) * b * len(self.members) / (time.perf_counter() - t0)
                        for k, (m, log) in enumerate(zip(self.members, logs)):
                            if i < self.steps_K[k] and ((i + 1) % train.LOG_EVERY == 0 or i + 1 == self.steps_K[k]):
                                # The mean over the member's steps since its last line, as train logs it.
                                last = float(window_WK[marks[k] - base:i + 1 - base, k].mean())
                                marks[k] = i + 1
                                if not math.isfinite(last):
                                    raise train.diverged(last, epoch * int(self.steps_K[k]) + i, m.cfg)
                                g = epoch * int(self.steps_K[k]) + i
                                log({"step": g + 1, "epoch": epoch, "loss": last,
                                     "lr": float(self.trainers[k].lr_S[g]), "images_per_s": rate / len(self.members),
                                     "stack": len(self.members)})
                        bar.update((i + 1) - bar.n)
                        bar.set_postfix(img_s=f"{rate:.0f}")
            self.unstack_into_trainers(state)
            loss_SK = jnp.stack(losses)
            for k, (m, t, mngr, log) in enumerate(zip(self.members, self.trainers, mngrs, logs)):
                mean = float(loss_SK[: self.steps_K[k], k].mean())
                checkpoint.save(mngr, m.ckpt_dir, epoch + 1, t)
                log({"epoch": epoch, "mean_loss": mean, "seconds": time.perf_counter() - t0, "stack": len(self.members)})
            faults.point("stack-epoch")
            means.append(float(loss_SK.mean()))
        return means


def train_members(members: list[Member], x_NHWC: np.ndarray, y_N: np.ndarray, image_shape, num_classes: int,
                  max_stack: int) -> dict[str, dict[str, Any]]:
    """Trains every member that is not finished yet, in stacks of up to max_stack members that agree
    on stack_key and on the epoch they resume from; returns {key: train.train's info}."""
    infos: dict[str, dict[str, Any]] = {}
    todo = []
    for m in members:
        train.check_batch(m.cfg.train.batch_size, "--train.batch_size", len(m.idx_N))
        if checkpoint.finished(m.ckpt_dir, m.key):
            infos[m.key] = {"reused": True, "resumed_from_epoch": m.cfg.train.epochs, "seconds": 0.0, "images_per_s": None}
        else:
            todo.append(m)
    groups: dict[tuple, list[Member]] = {}
    for m in todo:
        groups.setdefault(stack_key(m.cfg), []).append(m)
    x = jnp.asarray(x_NHWC)
    y = jnp.asarray(y_N, jnp.int32)
    for group in groups.values():
        for start in range(0, len(group), max_stack):
            infos.update(_train_stack(group[start:start + max_stack], x, y, image_shape, num_classes))
    return infos


def _train_stack(members: list[Member], x, y, image_shape, num_classes) -> dict[str, dict[str, Any]]:
    import contextlib

    stack = Stack(members, image_shape, num_classes)
    with contextlib.ExitStack() as locks:
        mngrs, starts = [], []
        for m, t in zip(members, stack.trainers):
            locks.enter_context(files.exclusive(m.ckpt_dir.parent / f".{m.ckpt_dir.name}.lock"))
            mngr, start = checkpoint.open_for_training(t, m.ckpt_dir, m.key)
            locks.callback(mngr.close)
            mngrs.append(mngr)
            starts.append(start)
        if len(set(starts)) > 1:  # members killed at different epochs: each finishes on its own
            infos = {}
            for m, t, mngr, start in zip(members, stack.trainers, mngrs, starts):
                infos[m.key] = train.resume(t, mngr, x[m.idx_N], y[m.idx_N], m.ckpt_dir, m.key, start, m.desc)
            return infos
        x, y = jax.device_put((x, y), stack.replicated)
        logs = [train.Log(m.ckpt_dir / "metrics.jsonl", starts[0]) for m in members]
        t0 = time.perf_counter()
        stack.fit(x, y, starts[0], logs, mngrs)
        seconds = time.perf_counter() - t0
        infos = {}
        for m, t in zip(members, stack.trainers):
            checkpoint.mark_done(m.ckpt_dir, m.key, m.cfg.train.epochs)
            infos[m.key] = {"reused": False, "resumed_from_epoch": starts[0], "seconds": seconds, "images_per_s": None,
                            "stacked": len(members)}
        return infos


def predict(trainers: list[train.Trainer], x_NHWC: np.ndarray, idx_K: list[np.ndarray],
            desc: str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(pred_N, feats_ND) of each model on its own images (indices into x), one vmapped pass."""
    if not trainers:
        return []
    t0 = trainers[0]
    b = t0.cfg.eval.batch_size
    n_max = max(len(i) for i in idx_K)
    steps = train.steps_per_epoch(n_max, b)
    pad = np.stack([np.pad(i, (0, steps * b - len(i)), mode="edge") if len(i) else np.zeros(steps * b, np.int64)
                    for i in idx_K])
    states = jax.tree.map(lambda *a: jnp.stack(a), *[t.model_state for t in trainers])
    fwd = jax.jit(jax.vmap(lambda s, x, i: train.forward(t0.eval_def, s, x[i]), in_axes=(0, None, 0)))
    x = jax.device_put(jnp.asarray(x_NHWC), t0.replicated)
    outs = []
    for j in tqdm(range(steps), desc=desc, leave=False, disable=desc is None):
        outs.append(fwd(states, x, jnp.asarray(pad[:, j * b:(j + 1) * b])))
        train.throttle(outs)
    pred = np.asarray(jnp.concatenate([o[0] for o in outs], 1))
    feats = np.asarray(jnp.concatenate([o[1] for o in outs], 1))
    return [(pred[k, :len(i)], feats[k, :len(i)]) for k, i in enumerate(idx_K)]


def check_stack_size(k: int) -> None:
    if k < 1:
        raise UserError(f"--stack {k}: must be >= 1")


# -- the runs of a sweep, stacked ---------------------------------------------------------------
def baseline_member(p: experiment.Prepared, shared_dir: Path) -> Member:
    """The baseline of a prepared run, kept under shared_dir/baselines/ as `experiment.run` keeps it."""
    return Member(p.cfg, np.arange(len(p.poisoned.y_N)), shared_dir / "baselines" / p.model_key, p.model_key,
                  "baseline")


def retrain_member(p: experiment.Prepared, dataset: data.Dataset, baseline: train.Trainer,
                   shared_dir: Path) -> Member | None:
    """What a run retrains after its defense, or None when it retrains nothing. `baseline`: the
    run's finished baseline, loaded; its passes and the defense's result are read from their
    caches or computed and kept, so the run itself finds them later."""
    baseline_dir = shared_dir / "baselines" / p.model_key
    passes = experiment.baseline_passes(baseline, p, dataset, [baseline_dir], p.cfg, {})
    view = experiment.defense_view(p.cfg, dataset, p, baseline, [baseline_dir], passes)
    keep_N = experiment.defend(p, view, p.cfg).is_clean_N
    if not p.cfg.defense.retrain or keep_N.all():
        return None
    key, directory = experiment.retrain_target(p, keep_N, shared_dir, None)
    return Member(p.cfg, np.flatnonzero(keep_N), directory, key, "retrain")


def _loaded(m: Member, p: experiment.Prepared, dataset: data.Dataset) -> train.Trainer:
    t = train.Trainer(m.cfg, dataset.x_train.shape[1:], dataset.num_classes,
                      train.steps_per_epoch(len(m.idx_N), m.cfg.train.batch_size))
    checkpoint.load(t, m.ckpt_dir)
    return t


def stacked_passes(jobs: list[tuple[Member, experiment.Prepared]], dataset: data.Dataset) -> None:
    """Writes passes.npz of finished baselines that have none, in one vmapped pass per set: the
    training set, the test split and the triggered test images of each."""
    todo = [(m, p) for m, p in jobs
            if cache.load_npz(m.ckpt_dir / "passes.npz", experiment.passes_key(p, m.cfg),
                              experiment.passes_fit(p, dataset)) is None]
    groups: dict[tuple, list[int]] = {}
    for i, (m, _) in enumerate(todo):
        groups.setdefault((m.cfg.train.model, m.cfg.eval.batch_size), []).append(i)
    for group in groups.values():
        ts = [_loaded(*todo[i], dataset) for i in group]
        runs = [todo[i][1] for i in group]
        xs, offsets = _concat([p.poisoned.x_NHWC for p in runs])
        feats = predict(ts, xs, [o + np.arange(len(p.poisoned.y_N)) for o, p in zip(offsets, runs)], "features")
        tests = predict(ts, dataset.x_test, [np.arange(len(dataset.y_test))] * len(ts), "test")
        trig_x, trig_off = _concat([p.triggered.x_NHWC for p in runs])
        trig = predict(ts, trig_x, [o + np.arange(len(p.triggered.idx)) for o, p in zip(trig_off, runs)], "triggered")
        for i, (pred, f), (pt, ft), (pg, _) in zip(group, feats, tests, trig):
            m, p = todo[i]
            cache.save_npz(m.ckpt_dir / "passes.npz", key=np.asarray(experiment.passes_key(p, m.cfg)), pred=pred,
                           feats=f, pred_test=pt, feats_test=ft, pred_trig=pg)


def _concat(arrays: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    offsets = np.cumsum([0] + [len(a) for a in arrays])[:-1].tolist()
    return (np.concatenate(arrays) if arrays else np.zeros((0,))), offsets


def _train_chunks(jobs: list[tuple[Member, experiment.Prepared]], dataset: data.Dataset, k: int) -> None:
    """Stacks of up to k members that agree on stack_key, each stack on the images of its own runs
    (runs of one baseline share them)."""
    groups: dict[tuple, list] = {}
    for m, p in jobs:
        groups.setdefault(stack_key(m.cfg), []).append((m, p))
    for group in groups.values():
        for start in range(0, len(group), k):
            xs, ys, members, offsets = [], [], [], {}
            for m, p in group[start:start + k]:
                if p.model_key not in offsets:
                    offsets[p.model_key] = sum(len(x) for x in xs)
                    xs.append(p.poisoned.x_NHWC)
                    ys.append(p.poisoned.y_N)
                members.append(dataclasses.replace(m, idx_N=offsets[p.model_key] + m.idx_N))
            train_members(members, np.concatenate(xs), np.concatenate(ys), dataset.x_train.shape[1:],
                          dataset.num_classes, k)


def train_runs(prepared: list[experiment.Prepared], dataset: data.Dataset, shared_dir: str | os.PathLike,
               k: int) -> None:
    """Trains every model the prepared runs (of one dataset) need, in stacks of up to k: their
    baselines, the baselines' passes, then what each run retrains after its defense."""
    shared_dir = Path(shared_dir)
    baselines: dict[str, tuple[Member, experiment.Prepared]] = {}
    for p in prepared:
        baselines.setdefault(p.model_key, (baseline_member(p, shared_dir), p))
    _train_chunks(list(baselines.values()), dataset, k)
    stacked_passes(list(baselines.values()), dataset)
    loaded: dict[str, train.Trainer] = {}
    retrains: dict[str, tuple[Member, experiment.Prepared]] = {}
    for p in prepared:
        if p.model_key not in loaded:
            loaded[p.model_key] = _loaded(*baselines[p.model_key], dataset)
        m = retrain_member(p, dataset, loaded[p.model_key], shared_dir)
        if m is not None:
            retrains.setdefault(m.key, (m, p))
    _train_chunks(list(retrains.values()), dataset, k)
