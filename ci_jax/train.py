"""Training, checkpointing and batched inference, data-parallel over all local devices.

The data set lives on the devices (replicated: MNIST-size sets fit everywhere); each step
gathers its batch there, so no images cross from the host inside a loop. Batches are sharded
over a 1-D `data` mesh axis and parameters are replicated, so the same code runs on one CPU,
several forced CPU devices, or a GPU/TPU host.

A checkpoint (`checkpoint`) holds the named train state, {"model": ..., "optimizer": ...} as
nested dicts of arrays with the parameters' names, and each model's directory has a training log,
metrics.jsonl.

Multi-host: launch one process per host with the same command and call `init_distributed()`
first (the `ci-jax` commands do); `jax.devices()` then lists every host's devices, the mesh spans
them all, and each process feeds the same replicated data set. Results that leave the devices
(`predict`) are gathered from every process.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from ci_jax import augment, checkpoint, faults, files, metrics, models
from ci_jax.errors import UserError, one_line

LOG_EVERY = 25  # steps between loss read-backs (each one syncs host and device) and log lines


def init_distributed() -> bool:
    """Joins a multi-process JAX job when the environment describes one; True if it did.

    Recognised: an explicit launch (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID,
    optionally JAX_LOCAL_DEVICE_IDS), or a Slurm (`srun`) / Open MPI (`mpirun`) launch of more
    than one task, whose variables jax reads itself. A plain single-process run does nothing.
    Must run before JAX touches a device.
    """
    if jax.distributed.is_initialized():
        return True
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
        return True
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()
        return True
    return False


def _to_host(a: jax.Array) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(a)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def max_in_flight() -> int | None:
    """How many multi-device programs may be queued at once; None: no limit.

    XLA:CPU runs each device's part of a program on one shared thread pool. With many programs
    queued, one device's part can wait at an all-reduce for a partner part that is never
    scheduled (a chain of dependent 2-device steps aborted at the rendezvous every time, and never
    with at most 2 in flight). GPUs and TPUs queue each device's work on its own stream.
    """
    return 2 if jax.default_backend() == "cpu" and jax.device_count() > 1 else None


def throttle(pending: list[Any]) -> None:
    """Waits for the result queued max_in_flight() calls ago; call after each dispatch."""
    k = max_in_flight()
    if k is not None and len(pending) > k:
        jax.block_until_ready(pending[-1 - k])


def mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), ("data",))


def check_batch(batch: int, flag: str, n: int | None = None) -> None:
    """UserError unless `batch` splits over the devices and, when n is given, fits a set of n."""
    d = jax.device_count()
    if batch % d:
        raise UserError(f"{flag} = {batch} does not split over {d} devices: use a multiple of {d}")
    if n is not None and batch > max(n, d):
        raise UserError(f"{flag} = {batch} is larger than the {n} images it batches: "
                        f"use at most {max(n, d) // d * d}")


def steps_per_epoch(n: int, batch: int) -> int:
    return max(1, math.ceil(n / batch))


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer, its learning rate injected at every step (so that models with different
    schedules can share one step, see `stack`), and the schedule that gives it."""
    t = cfg.train
    if t.schedule == "onecycle":
        schedule = optax.cosine_onecycle_schedule(total_steps, t.lr, pct_start=0.25, div_factor=25.0,
                                                  final_div_factor=1e3)
    elif t.schedule == "cosine":
        schedule = optax.cosine_decay_schedule(t.lr, total_steps)
    else:
        schedule = optax.constant_schedule(t.lr)
    # Decay kernels only, not BatchNorm scales and biases.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    if t.optimizer == "adam":
        tx = optax.inject_hyperparams(optax.adamw)(learning_rate=t.lr, weight_decay=t.weight_decay, mask=decay_mask)
    else:
        tx = optax.inject_hyperparams(lambda learning_rate: optax.chain(
            optax.add_decayed_weights(t.weight_decay, mask=decay_mask),
            optax.sgd(learning_rate, momentum=t.momentum or None, nesterov=t.nesterov)))(learning_rate=t.lr)
    return tx, schedule


def lr_table(schedule: optax.Schedule, total_steps: int) -> jax.Array:
    """The learning rate of every step, evaluated on the device as the schedule would be in-graph."""
    return jax.jit(jax.vmap(schedule))(jnp.arange(total_steps)).astype(jnp.float32)


def update(train_def, state, x_BHWC: jax.Array, y_B: jax.Array, lr: jax.Array):
    """One optimizer step of one model on one batch: (new state, loss). Shared by `Trainer` and
    `stack.Stack` (vmapped there)."""
    model, opt = nnx.merge(train_def, state)

    def loss_fn(m):
        logits_BK, _ = m(x_BHWC)
        # The loss in float32 whatever the compute dtype (a no-op at float32).
        return optax.softmax_cross_entropy_with_integer_labels(logits_BK.astype(jnp.float32), y_B).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.opt_state.hyperparams["learning_rate"][...] = lr
    opt.update(model, grads)
    return nnx.state((model, opt)), loss


def forward(eval_def, model_state, x_BHWC: jax.Array):
    """(decisions, penultimate features, logits) of one model on a batch."""
    model = nnx.merge(eval_def, model_state)
    logits_BK, feats_BD = model(x_BHWC)
    # The defenses get float32 whatever the compute dtype (no-ops at float32).
    logits_BK, feats_BD = logits_BK.astype(jnp.float32), feats_BD.astype(jnp.float32)
    return jnp.argmax(logits_BK, -1).astype(jnp.int32), feats_BD, logits_BK


def diverged(loss: float, step: int, cfg) -> UserError:
    t = cfg.train
    return UserError(f"training diverged: loss is {loss} at step {step} (lr {t.lr}, weight decay {t.weight_decay}): "
                     "lower --train.lr or --train.weight_decay, or change --train.optimizer")


def epoch_indices(seed: int, n: int, batch: int, epoch: int) -> jax.Array:
    """(steps, B) indices of one epoch: a permutation of n drawn from (seed, epoch), wrapped
    round so that every batch is full."""
    steps = steps_per_epoch(n, batch)
    perm = jax.random.permutation(jax.random.fold_in(jax.random.key(seed), epoch), n)
    reps = math.ceil(steps * batch / n)
    return jnp.concatenate([perm] * reps)[: steps * batch].reshape(steps, batch)


def _out_of_memory(e: Exception, flag: str, batch: int) -> UserError | None:
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or isinstance(e, MemoryError):
        return UserError(f"out of device memory at {flag} = {batch}: lower it ({one_line(text, 120)})")
    return None


class Trainer:
    """A model, its optimizer and the jitted functions over them; the state is a pure pytree."""

    def __init__(self, cfg, image_shape: tuple[int, int, int], num_classes: int, steps_per_epoch: int):
        self.cfg, self.mesh = cfg, mesh()
        self.replicated = NamedSharding(self.mesh, P())
        self.sharded = NamedSharding(self.mesh, P("data"))
        self.total_steps = steps_per_epoch * cfg.train.epochs
        model = models.create(cfg.train.model, image_shape[-1], num_classes, cfg.seed, image_size=image_shape[0])
        # Set before the split: train_def and eval_def both carry it, so the defenses' passes
        # compute in the dtype the model was trained in.
        models.set_compute_dtype(model, cfg.train.dtype)
        tx, self.schedule = make_optimizer(cfg, self.total_steps)
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        model.train()
        self.train_def, state = nnx.split((model, opt))
        model.eval()
        self.eval_def, _ = nnx.split(model)
        self.state = jax.device_put(state, self.replicated)
        self.lr_S = jax.device_put(lr_table(self.schedule, max(1, self.total_steps)), self.replicated)
        # None when off: the step is then the very program it was before augmentation existed.
        self.augment = augment.policy(cfg.train.augment, cfg.data.dataset)
        self.train_step = jax.jit(self._step, donate_argnums=0)
        self.eval_step = jax.jit(self._fwd, static_argnums=3)

    @property
    def model_state(self) -> nnx.State:
        return self.state[0]

    # -- jitted bodies --------------------------------------------------------------------------
    def _step(self, state, x_NHWC, y_N, idx_SB, i, lr_S, g):
        idx_B = idx_SB[i]  # indexed inside the step: no extra dispatch per step
        x_BHWC = augment.apply(self.augment, x_NHWC[idx_B], self.cfg.seed, g)
        x_BHWC = jax.lax.with_sharding_constraint(x_BHWC, self.sharded)
        y_B = jax.lax.with_sharding_constraint(y_N[idx_B], self.sharded)
        return update(self.train_def, state, x_BHWC, y_B, lr_S[g])

    def _fwd(self, model_state, x_NHWC, start, batch: int):
        # Per-image work only: predict() queues many independent calls, and on forced CPU devices
        # (one shared thread pool) two in-flight calls that each wait at a cross-device
        # all-reduce can deadlock.
        x_BHWC = jax.lax.dynamic_slice_in_dim(x_NHWC, start, batch)
        return forward(self.eval_def, model_state, jax.lax.with_sharding_constraint(x_BHWC, self.sharded))

    # -- training -------------------------------------------------------------------------------
    def epoch_indices(self, n: int, epoch: int) -> jax.Array:
        return epoch_indices(self.cfg.seed, n, self.cfg.train.batch_size, epoch)

    def fit_epoch(self, x_NHWC: jax.Array, y_N: jax.Array, epoch: int, desc: str,
                  log: Callable[[dict[str, Any]], None] = lambda entry: None) -> float:
        """One epoch; every LOG_EVERY steps (and at the end) `log` gets the mean loss of the steps
        since its last line, the learning rate and images/s. Returns the epoch's mean loss."""
        idx_SB = self.epoch_indices(x_NHWC.shape[0], epoch)
        steps, b = idx_SB.shape
        losses, mark = [], 0
        t0 = time.perf_counter()
        with tqdm(total=steps, desc=f"{desc} epoch {epoch + 1}/{self.cfg.train.epochs}", unit="step",
                  leave=False, mininterval=1.0) as bar:
            for i in range(steps):
                self.state, loss = self.train_step(self.state, x_NHWC, y_N, idx_SB, i, self.lr_S, epoch * steps + i)
                losses.append(loss)
                throttle(losses)
                if (i + 1) % LOG_EVERY == 0 or i + 1 == steps:
                    # A NaN anywhere in the window makes its mean NaN: divergence is still caught.
                    last, step, mark = float(jnp.stack(losses[mark:]).mean()), epoch * steps + i, i + 1
                    if not math.isfinite(last):
                        raise diverged(last, step, self.cfg)
                    rate = (i + 1) * b / (time.perf_counter() - t0)
                    log({"step": step + 1, "epoch": epoch, "loss": last, "lr": float(self.schedule(step)),
                         "images_per_s": rate})
                    bar.update((i + 1) - bar.n)
                    bar.set_postfix(loss=f"{last:.4f}", img_s=f"{rate:.0f}")
        return float(jnp.stack(losses).mean())

    # -- inference ------------------------------------------------------------------------------
    def predict(self, x_NHWC: np.ndarray | jax.Array, transform: Callable | None = None,
                desc: str | None = None, logits: bool = False, model: Callable | None = None) -> tuple[np.ndarray, ...]:
        """(pred_N, feats_ND) for every image, in fixed-size batches (the last one padded), and
        logits_NK as well when `logits`.

        transform: an image filter applied first, image by image (no reduction over the batch).
        model: (graphdef, state) -> state, the model to run instead of this one (a model
        perturbation: a transformed copy of its state, of the same structure, so the forward pass
        is compiled once for every such model).
        """
        b = self.cfg.eval.batch_size
        check_batch(b, "--eval.batch_size")
        n = x_NHWC.shape[0]
        steps = steps_per_epoch(n, b)  # one padded batch for n = 0: empty outputs of the right shapes
        try:
            x = jnp.asarray(x_NHWC)
            if steps * b != n:
                x = jnp.pad(x, ((0, steps * b - n),) + ((0, 0),) * (x.ndim - 1))
            x = jax.device_put(x, self.replicated)
            if transform is not None:
                # The whole set in one program of its own: inside the forward's program XLA fused
                # the median filter into the grayscale stem's taps and computed it again for each
                # of their reads.
                x = jax.jit(transform)(x)
            state = self.model_state
            if model is not None:
                state = jax.device_put(jax.jit(model, static_argnums=0)(self.eval_def, state), self.replicated)
            outs = []
            for i in tqdm(range(steps), desc=desc, leave=False, disable=desc is None):
                outs.append(self.eval_step(state, x, i * b, b))
                throttle(outs)
            parts = range(3 if logits else 2)
            return tuple(_to_host(jnp.concatenate([o[k] for o in outs])[:n]) for k in parts)
        except (jax.errors.JaxRuntimeError, MemoryError) as e:
            oom = _out_of_memory(e, "--eval.batch_size", b)
            if oom is None:
                raise
            raise oom from None

    def accuracy(self, x_NHWC: np.ndarray, y_N: np.ndarray) -> float:
        pred, _ = self.predict(x_NHWC)
        return metrics.accuracy(pred, y_N)

    # -- the named state ------------------------------------------------------------------------
    def named_state(self) -> dict[str, Any]:
        """{"model": ..., "optimizer": ...}: nested dicts of arrays keyed by the parameters' names."""
        return {"model": _str_keys(nnx.to_pure_dict(self.state[0])),
                "optimizer": _str_keys(nnx.to_pure_dict(self.state[1]))}

    def load_named_state(self, named: dict[str, Any]) -> None:
        template = nnx.to_pure_dict(self.state)
        state = jax.tree.map(lambda a: a, self.state)  # a fresh container, the same structure
        nnx.replace_by_pure_dict(state, {0: _like(template[0], named["model"]),
                                         1: _like(template[1], named["optimizer"])})
        self.state = jax.device_put(state, self.replicated)


def _str_keys(tree: Any) -> Any:
    # Orbax stores keys as strings; a list's indices (blocks.0) come back as '0'.
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def _like(template: Any, named: Any) -> Any:
    """`named` (string keys) rebuilt with the key types of `template`."""
    if isinstance(template, dict):
        return {k: _like(v, named[str(k)]) for k, v in template.items()}
    return jnp.asarray(named)


Evaluate = Callable[["Trainer"], dict[str, float]]


def train(trainer: Trainer, x_NHWC: np.ndarray, y_N: np.ndarray, ckpt_dir: str | os.PathLike,
          key: str, desc: str = "train", evaluate: Evaluate | None = None) -> dict[str, Any]:
    """Trains to cfg.train.epochs, resuming from ckpt_dir; a finished run with the same key is reused.

    `key` names what was trained (config and data, training set); a directory holding another
    key is moved aside, not deleted (`checkpoint.open_for_training`). A damaged directory is a
    UserError that says to delete it. A finished model is only read (its directory may be
    read-only). Processes that share ckpt_dir (sweeps sharing --models) take turns: the second
    one reuses what the first trained instead of training into the same files at the same time.
    evaluate: called after each epoch; the rates it returns (e.g. clean accuracy and ASR) go into
    that epoch's line of metrics.jsonl, and its time is not counted as training.
    Returns {"reused": bool, "resumed_from_epoch": int, "seconds": float, "images_per_s": float}.
    """
    ckpt_dir = Path(ckpt_dir)
    check_batch(trainer.cfg.train.batch_size, "--train.batch_size", len(y_N))
    if len(y_N) == 0:
        raise UserError("the training set is empty: nothing to train on")
    if checkpoint.finished(ckpt_dir, key):
        return {"reused": True, "resumed_from_epoch": checkpoint.load(trainer, ckpt_dir), "seconds": 0.0,
                "images_per_s": None}
    with files.exclusive(ckpt_dir.parent / f".{ckpt_dir.name}.lock"):
        return _train_locked(trainer, x_NHWC, y_N, ckpt_dir, key, desc, evaluate)


def _train_locked(trainer: Trainer, x_NHWC: np.ndarray, y_N: np.ndarray, ckpt_dir: Path, key: str,
                  desc: str, evaluate: Evaluate | None) -> dict[str, Any]:
    mngr, start = checkpoint.open_for_training(trainer, ckpt_dir, key)
    try:
        if start == trainer.cfg.train.epochs and checkpoint.finished(ckpt_dir, key):
            return {"reused": True, "resumed_from_epoch": start, "seconds": 0.0, "images_per_s": None}
        return resume(trainer, mngr, x_NHWC, y_N, ckpt_dir, key, start, desc, evaluate)
    finally:
        mngr.close()  # also after a failure: leaves no Orbax threads behind


class Log:
    """The training log, metrics.jsonl: one JSON object a line, every LOG_EVERY steps and per epoch.

    On resume from epoch e the lines of later epochs (from the interrupted run) are dropped, so
    the log always describes the checkpoint's own trajectory.
    """

    def __init__(self, path: Path, start_epoch: int) -> None:
        self.path = path
        kept = [line for line in _read_lines(path) if line.get("epoch", math.inf) < start_epoch]
        files.write_text(path, "".join(json.dumps(line) + "\n" for line in kept))

    def __call__(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry, allow_nan=False) + "\n")


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """The log's entries; a line that does not parse (cut short by a kill, damaged bytes) is
    skipped: the log only describes training, the checkpoint holds the model."""
    out = []
    try:
        with open(path, "rb") as f:
            raw = f.read().splitlines()
    except OSError:
        return out
    for line in raw:
        try:
            entry = json.loads(line)
        except ValueError:  # bad JSON or bad UTF-8
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def read_log(ckpt_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The training log of a model directory (metrics.jsonl), oldest first."""
    return _read_lines(Path(ckpt_dir) / "metrics.jsonl")


def resume(trainer: Trainer, mngr: checkpoint.Manager, x_NHWC: np.ndarray, y_N: np.ndarray,
           ckpt_dir: Path, key: str, start_epoch: int, desc: str, evaluate: Evaluate | None = None) -> dict[str, Any]:
    """Trains `trainer` (restored at start_epoch) to the end, saving each epoch, then marks done."""
    epochs = trainer.cfg.train.epochs
    log = Log(ckpt_dir / "metrics.jsonl", start_epoch)
    b = trainer.cfg.train.batch_size
    try:
        x = jax.device_put(jnp.asarray(x_NHWC), trainer.replicated)
        y = jax.device_put(jnp.asarray(y_N, jnp.int32), trainer.replicated)
        t0, evaluating = time.perf_counter(), 0.0
        for epoch in range(start_epoch, epochs):
            t_epoch = time.perf_counter()
            loss = trainer.fit_epoch(x, y, epoch, desc, log)
            checkpoint.save(mngr, ckpt_dir, epoch + 1, trainer)
            seconds = time.perf_counter() - t_epoch
            scores = evaluate(trainer) if evaluate is not None else {}
            evaluating += time.perf_counter() - t_epoch - seconds
            log({"epoch": epoch, "mean_loss": loss, "seconds": seconds, **scores})
            faults.point(f"{desc}-epoch")
            tqdm.write(f"{desc}: epoch {epoch + 1}/{epochs} mean loss {loss:.4f}"
                       + "".join(f", {k} {metrics.fmt_rate(v)}" for k, v in scores.items()))
    except (jax.errors.JaxRuntimeError, MemoryError) as e:
        oom = _out_of_memory(e, "--train.batch_size", b)
        if oom is None:
            raise
        raise oom from None
    seconds = time.perf_counter() - t0 - evaluating
    n_img = (epochs - start_epoch) * steps_per_epoch(len(y_N), b) * b
    checkpoint.mark_done(ckpt_dir, key, epochs)
    return {"reused": False, "resumed_from_epoch": start_epoch, "seconds": seconds,
            "images_per_s": n_img / seconds if seconds > 0 else None}
