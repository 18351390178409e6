"""Training, checkpointing and batched inference, data-parallel over all local devices.

The data set lives on the devices (replicated: MNIST-size sets fit everywhere); each step
gathers its batch there, so no images cross from the host inside a loop. Batches are sharded
over a 1-D `data` mesh axis and parameters are replicated, so the same code runs on one CPU,
several forced CPU devices, or a GPU/TPU host.

Multi-host: launch one process per host with the same command and call `init_distributed()`
first (the `ci-jax` commands do); `jax.devices()` then lists every host's devices, the mesh spans
them all, and each process feeds the same replicated data set. Results that leave the devices
(`predict`) are gathered from every process.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from ci_jax import faults, files, metrics, models
from ci_jax.config import Config
from ci_jax.errors import UserError

LOG_EVERY = 25  # steps between loss read-backs: each one syncs host and device


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
    scheduled: a chain of 3000 dependent 2-device steps (matmul + all-reduce) aborted at the
    rendezvous ("Termination timeout ... exceeded", only 1 of 2 threads arrived) every time,
    and never with at most 2 in flight. GPUs and TPUs queue each device's work on its own stream.
    """
    return 2 if jax.default_backend() == "cpu" and jax.device_count() > 1 else None


def throttle(pending: list[Any]) -> None:
    """Waits for the result queued max_in_flight() calls ago; call after each dispatch."""
    k = max_in_flight()
    if k is not None and len(pending) > k:
        jax.block_until_ready(pending[-1 - k])


def mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), ("data",))


def _shardings(m: Mesh) -> tuple[NamedSharding, NamedSharding]:
    return NamedSharding(m, P()), NamedSharding(m, P("data"))


def _check_divisible(batch: int, what: str) -> None:
    n = jax.device_count()
    if batch % n:
        raise UserError(f"{what} = {batch} does not split over {n} devices: use a multiple of {n}")


def make_optimizer(cfg: Config, total_steps: int) -> optax.GradientTransformation:
    if cfg.schedule == "onecycle":
        lr = optax.cosine_onecycle_schedule(total_steps, cfg.lr, pct_start=0.25, div_factor=25.0,
                                            final_div_factor=1e3)
    elif cfg.schedule == "cosine":
        lr = optax.cosine_decay_schedule(cfg.lr, total_steps)
    else:
        lr = optax.constant_schedule(cfg.lr)
    # Decay kernels only, not BatchNorm scales and biases.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    if cfg.optimizer == "adam":
        return optax.adamw(lr, weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
                       optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov))


class Trainer:
    """A model, its optimizer and the jitted functions over them; state is a pure pytree."""

    def __init__(self, cfg: Config, image_shape: tuple[int, int, int], num_classes: int, steps_per_epoch: int):
        self.cfg, self.mesh = cfg, mesh()
        self.replicated, self.sharded = _shardings(self.mesh)
        self.total_steps = steps_per_epoch * cfg.epochs
        model = models.create(cfg.model, image_shape[-1], num_classes, cfg.seed, image_size=image_shape[0])
        opt = nnx.Optimizer(model, make_optimizer(cfg, self.total_steps), wrt=nnx.Param)
        model.train()
        self.train_def, state = nnx.split((model, opt))
        model.eval()
        self.eval_def, _ = nnx.split(model)
        self.state = jax.device_put(state, self.replicated)
        self._train_step = jax.jit(self._step, donate_argnums=0)
        self._forward = jax.jit(self._fwd, static_argnums=3)

    # -- jitted bodies --------------------------------------------------------------------------
    def _step(self, state, x_NHWC, y_N, idx_SB, i):
        model, opt = nnx.merge(self.train_def, state)
        idx_B = idx_SB[i]  # indexed inside the step: no extra dispatch per step
        x_BHWC = jax.lax.with_sharding_constraint(x_NHWC[idx_B], self.sharded)
        y_B = jax.lax.with_sharding_constraint(y_N[idx_B], self.sharded)

        def loss_fn(m):
            logits_BK, _ = m(x_BHWC)
            return optax.softmax_cross_entropy_with_integer_labels(logits_BK, y_B).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return nnx.state((model, opt)), loss

    def _fwd(self, model_state, x_NHWC, start, batch: int):
        # Per-image work only: predict() queues many independent calls, and on forced CPU devices
        # (one shared thread pool) two in-flight calls that each wait at a cross-device
        # all-reduce can deadlock.
        model = nnx.merge(self.eval_def, model_state)
        x_BHWC = jax.lax.dynamic_slice_in_dim(x_NHWC, start, batch)
        x_BHWC = jax.lax.with_sharding_constraint(x_BHWC, self.sharded)
        logits_BK, feats_BD = model(x_BHWC)
        return jnp.argmax(logits_BK, -1).astype(jnp.int32), feats_BD

    # -- training -------------------------------------------------------------------------------
    def epoch_indices(self, n: int, epoch: int) -> jax.Array:
        """(steps, B) indices: a seeded permutation, wrapped round so every batch is full."""
        b = self.cfg.batch_size
        steps = math.ceil(n / b)
        key = jax.random.fold_in(jax.random.key(self.cfg.seed), epoch)
        perm = jax.random.permutation(key, n)
        return jnp.concatenate([perm, perm[: steps * b - n]]).reshape(steps, b)

    def fit_epoch(self, x_NHWC: jax.Array, y_N: jax.Array, epoch: int, desc: str) -> float:
        idx_SB = self.epoch_indices(x_NHWC.shape[0], epoch)
        steps, b = idx_SB.shape
        losses = []
        t0 = time.perf_counter()
        with tqdm(total=steps, desc=f"{desc} epoch {epoch + 1}/{self.cfg.epochs}", unit="step",
                  leave=False, mininterval=1.0) as bar:
            for i in range(steps):
                self.state, loss = self._train_step(self.state, x_NHWC, y_N, idx_SB, i)
                losses.append(loss)
                throttle(losses)
                if (i + 1) % LOG_EVERY == 0 or i + 1 == steps:
                    last = float(loss)
                    if not math.isfinite(last):
                        step = epoch * steps + i
                        raise UserError(f"training diverged: loss is {last} at step {step} "
                                        f"(lr {self.cfg.lr}): lower --lr or change --optimizer")
                    done = (i + 1) - bar.n
                    bar.update(done)
                    bar.set_postfix(loss=f"{last:.4f}", img_s=f"{(i + 1) * b / (time.perf_counter() - t0):.0f}")
        return float(jnp.stack(losses).mean())

    # -- inference ------------------------------------------------------------------------------
    def predict(self, x_NHWC: np.ndarray | jax.Array, transform: Callable | None = None,
                desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(pred_N, feats_ND) for every image, in fixed-size batches (the last one padded).

        transform: an image filter applied first, image by image (no reduction over the batch).
        """
        b = self.cfg.eval_batch_size
        _check_divisible(b, "eval_batch_size")
        n = x_NHWC.shape[0]
        steps = max(1, math.ceil(n / b))  # one padded batch for n = 0: empty outputs of the right shapes
        x = jnp.asarray(x_NHWC)
        if steps * b != n:
            x = jnp.pad(x, ((0, steps * b - n),) + ((0, 0),) * (x.ndim - 1))
        x = jax.device_put(x, self.replicated)
        if transform is not None:
            # The whole set in one program of its own: inside the forward's program XLA fused the
            # median filter into the grayscale stem's taps and computed it again for each of their
            # reads (5 of 46 ms per batch of 64 on a CPU), against 0.2 ms for the filter alone.
            x = jax.jit(transform)(x)
        model_state = self.state[0]
        outs = []
        for i in tqdm(range(steps), desc=desc, leave=False, disable=desc is None):
            outs.append(self._forward(model_state, x, i * b, b))
            throttle(outs)
        pred = jnp.concatenate([o[0] for o in outs])[:n]
        feats = jnp.concatenate([o[1] for o in outs])[:n]
        return _to_host(pred), _to_host(feats)

    def accuracy(self, x_NHWC: np.ndarray, y_N: np.ndarray) -> float:
        pred, _ = self.predict(x_NHWC)
        return metrics.accuracy(pred, y_N)

    # -- checkpoints ----------------------------------------------------------------------------
    def leaves(self) -> list[jax.Array]:
        return jax.tree.leaves(self.state)

    def load_leaves(self, leaves: list[Any]) -> None:
        treedef = jax.tree.structure(self.state)
        self.state = jax.device_put(jax.tree.unflatten(treedef, [jnp.asarray(l) for l in leaves]),
                                    self.replicated)


def _manager(ckpt_dir: Path) -> ocp.CheckpointManager:
    # max_to_keep=1: only the latest epoch is needed to resume; Orbax writes each step to a
    # temporary directory and renames it when complete, so a killed save is never read back.
    return ocp.CheckpointManager(ckpt_dir.resolve(), options=ocp.CheckpointManagerOptions(
        max_to_keep=1, enable_async_checkpointing=False))


def _damaged(ckpt_dir: Path, what: str) -> UserError:
    return UserError(f"checkpoint directory {ckpt_dir} is damaged ({what}): delete that directory "
                     f"to train this model again from scratch")


def _read_marker(ckpt_dir: Path, name: str) -> dict[str, Any] | None:
    """key.json / done.json as a dict with a "key"; None if absent; UserError if unreadable."""
    path = ckpt_dir / name
    if not path.exists():
        return None
    try:
        d = files.read_json(path)
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise _damaged(ckpt_dir, f"{name} is unreadable: {type(e).__name__}") from None
    if not isinstance(d, dict) or not isinstance(d.get("key"), str):
        raise _damaged(ckpt_dir, f"{name} does not hold a key")
    return d


def _restore(mngr: ocp.CheckpointManager, trainer: Trainer, ckpt_dir: Path) -> int:
    """Loads the latest finalized step into `trainer`; returns it (0 when there is none).

    Orbax lists only finalized steps (saved under a temporary name, then renamed), so what a
    killed save left behind is never seen here; a finalized step that fails to restore was
    damaged afterwards (a deleted or truncated file).
    """
    latest = None
    try:
        latest = mngr.latest_step()
        if latest is None:
            return 0
        restored = mngr.restore(latest, args=ocp.args.StandardRestore(
            [ocp.utils.to_shape_dtype_struct(np.asarray(l)) for l in trainer.leaves()]))
    except Exception as e:  # tensorstore, JSON, OSError, ...: the list of ways to fail is open
        step = f"epoch {latest}" if latest is not None else "its step list"
        raise _damaged(ckpt_dir, f"cannot restore {step}: {type(e).__name__}: "
                                 f"{_one_line(str(e))}") from e
    # Training stops before saving a non-finite loss, so non-finite weights mean damaged bytes.
    if not all(np.isfinite(np.asarray(l)).all() for l in restored if jnp.issubdtype(l.dtype, jnp.inexact)):
        raise _damaged(ckpt_dir, f"epoch {latest} holds non-finite weights")
    trainer.load_leaves(restored)
    return latest


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def train(trainer: Trainer, x_NHWC: np.ndarray, y_N: np.ndarray, ckpt_dir: str | os.PathLike,
          key: str, desc: str = "train") -> dict[str, Any]:
    """Trains to cfg.epochs, resuming from ckpt_dir; a finished run with the same key is reused.

    `key` names what was trained (config fingerprint, training set); a directory holding a
    different key is stale and is cleared. A damaged directory (unreadable key.json or done.json,
    a checkpoint that fails to restore) is a UserError that says to delete it. Processes that
    share ckpt_dir (sweeps sharing --models) take turns: the second one reuses what the first
    trained instead of training into the same files at the same time.
    Returns {"reused": bool, "resumed_from_epoch": int, "seconds": float, "images_per_s": float}.
    """
    ckpt_dir = Path(ckpt_dir)
    with files.exclusive(ckpt_dir.parent / f".{ckpt_dir.name}.lock"):
        return _train_locked(trainer, x_NHWC, y_N, ckpt_dir, key, desc)


def _train_locked(trainer: Trainer, x_NHWC: np.ndarray, y_N: np.ndarray, ckpt_dir: Path, key: str,
                  desc: str) -> dict[str, Any]:
    meta = _read_marker(ckpt_dir, "key.json")
    if meta is not None and meta["key"] != key:
        shutil.rmtree(ckpt_dir)
    elif meta is None and ((ckpt_dir / "orbax").exists() or (ckpt_dir / "done.json").exists()):
        # key.json is written before anything else: without it, whose weights these are is unknown.
        raise _damaged(ckpt_dir, "key.json is missing")
    done = _read_marker(ckpt_dir, "done.json")
    if done is not None and done["key"] != key:
        raise _damaged(ckpt_dir, "done.json and key.json disagree")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(ckpt_dir / "key.json", {"key": key})
    mngr = _manager(ckpt_dir / "orbax")
    try:
        return _train(trainer, mngr, x_NHWC, y_N, ckpt_dir, key, done is not None, desc)
    finally:
        mngr.close()  # also after a failure: leaves no Orbax threads behind


def _train(trainer: Trainer, mngr: ocp.CheckpointManager, x_NHWC: np.ndarray, y_N: np.ndarray,
           ckpt_dir: Path, key: str, done: bool, desc: str) -> dict[str, Any]:
    start_epoch = _restore(mngr, trainer, ckpt_dir)
    if done and start_epoch == trainer.cfg.epochs:
        return {"reused": True, "resumed_from_epoch": start_epoch, "seconds": 0.0, "images_per_s": None}
    _check_divisible(trainer.cfg.batch_size, "batch_size")
    x = jax.device_put(jnp.asarray(x_NHWC), trainer.replicated)
    y = jax.device_put(jnp.asarray(y_N, jnp.int32), trainer.replicated)
    t0 = time.perf_counter()
    for epoch in range(start_epoch, trainer.cfg.epochs):
        loss = trainer.fit_epoch(x, y, epoch, desc)
        mngr.save(epoch + 1, args=ocp.args.StandardSave(trainer.leaves()))
        mngr.wait_until_finished()
        faults.point(f"{desc}-epoch")
        tqdm.write(f"{desc}: epoch {epoch + 1}/{trainer.cfg.epochs} mean loss {loss:.4f}")
    seconds = time.perf_counter() - t0
    n_img = (trainer.cfg.epochs - start_epoch) * math.ceil(len(y_N) / trainer.cfg.batch_size) * trainer.cfg.batch_size
    files.write_json(ckpt_dir / "done.json", {"key": key, "epochs": trainer.cfg.epochs})
    return {"reused": False, "resumed_from_epoch": start_epoch, "seconds": seconds,
            "images_per_s": n_img / seconds if seconds > 0 else None}
