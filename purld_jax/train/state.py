"""Train state and optimizer shared by every stage (SFT, DPO, GRPO).

  tx, schedule = make_optimizer(learning_rate=1e-5, warmup_steps=10,
                                total_steps=100, ...)
  state = TrainState.create(graphdef, params, tx, rng=jax.random.PRNGKey(0))
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state, update_metrics = state.apply_grads(grads, loss=loss)

With LoRA (models/lora.py) `params` are the adapters alone and `frozen`
holds the base weights: gradients, the optimizer state and `arrays()` (the
checkpoint) cover the adapters only, and `model(params)` merges both; the
frozen base is reloaded from its source on a resume, never checkpointed.

`step` counts batches consumed (micro-batches when `grad_accum` > 1; the
schedule counts optimizer updates). An update whose loss or gradients are
not finite is never applied: `apply_grads` keeps the old params and
optimizer state (the step still advances, the batch is consumed) and says
so in its metrics (`skipped`, `nonfinite_loss`, `nonfinite_grads`). Whether
the run then goes on (`nan_policy = "skip"`) or stops is the loop's call
(`check_finite`), from those metrics, read one step late.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

NAN_POLICIES = ("skip", "stop")
# opt.mu_dtype: Adam's first moment. "float32" is optax's default (mu in the
# params' dtype: f32 with f32 params); "bfloat16" stores mu in bf16 (half the
# bytes; the update is still computed in f32 from it). The second moment nu
# always stays in the params' dtype (see `make_optimizer`).
MU_DTYPES = ("float32", "bfloat16")


class NonFiniteError(FloatingPointError):
  """A non-finite loss or gradient under nan_policy 'stop'."""


@flax.struct.dataclass
class TrainState:
  """What a step reads and writes.

  Attributes:
    graphdef: the model structure (static: `nnx.merge(graphdef, params)`).
    params: trained params, NNX pure-dict layout.
    opt_state: the optimizer state.
    step: i32[] batches consumed so far.
    rng: u32[2] the run's key; per-step keys are fold_in(rng, step).
    tx: the optimizer (static).
    frozen: None, or with LoRA the frozen base params (pure dict, every
      param but the adapters): merged into the model, never trained nor
      checkpointed (`sharded.jit_train_step` passes it undonated).
  """

  graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)
  params: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  frozen: Any = None

  @classmethod
  def create(cls, graphdef, params, tx: optax.GradientTransformation, *,
             rng: jax.Array, frozen=None) -> TrainState:
    return cls(graphdef=graphdef, params=params, opt_state=tx.init(params),
               step=jnp.zeros((), jnp.int32), rng=rng, tx=tx, frozen=frozen)

  def model(self, params=None):
    """The model with `params` (default: this state's), merged with the
    frozen base when there is one (LoRA: `params` are the adapters)."""
    params = self.params if params is None else params
    if self.frozen is None:
      return nnx.merge(self.graphdef, params)
    return nnx.merge(self.graphdef, params, self.frozen)

  def full_params(self, params=None) -> Any:
    """The whole model's pure dict: `params` (default: this state's) with
    the frozen base joined in (the same arrays, no copy)."""
    from purld_jax.models import lora  # pylint: disable=g-import-not-at-top
    params = self.params if params is None else params
    return params if self.frozen is None else lora.join(params, self.frozen)

  def step_key(self) -> jax.Array:
    """fold_in(rng, step): this step's key, the same after a resume."""
    return jax.random.fold_in(self.rng, self.step)

  def arrays(self) -> dict:
    """The checkpointed part: params, opt_state, step, rng (not `frozen`)."""
    return dict(params=self.params, opt_state=self.opt_state, step=self.step,
                rng=self.rng)

  def with_arrays(self, arrays: dict) -> TrainState:
    """This state with the arrays of `arrays()` (e.g. restored ones)."""
    return self.replace(**arrays)

  def apply_grads(self, grads, *, loss: jax.Array | None = None):
    """One optimizer step, skipped when the loss or the gradients are not
    finite (see the module docstring).

    Returns:
      (new state, metrics): `grad_norm` (before clipping), `skipped`,
      `nonfinite_loss`, `nonfinite_grads` (each 0. or 1.).
    """
    grad_norm = optax.global_norm(grads)
    bad_grads = ~jnp.isfinite(grad_norm)
    bad_loss = (jnp.zeros((), bool) if loss is None
                else ~jnp.all(jnp.isfinite(loss)))
    ok = ~(bad_grads | bad_loss)
    def update(params, opt_state, g):
      updates, opt_state = self.tx.update(g, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    # lax.cond rather than choosing with jnp.where: the update runs only when
    # it is applied, in place on the donated state, and no second copy of
    # the params and moments is held to choose from (XLA temporaries of a
    # SmolLM2-135M step: 0.81 -> 0.50 GiB).
    params, opt_state = jax.lax.cond(
        ok, update, lambda p, o, g: (p, o), self.params, self.opt_state,
        grads)
    new = self.replace(params=params, opt_state=opt_state,
                       step=self.step + 1)
    f32 = lambda b: b.astype(jnp.float32)
    return new, dict(grad_norm=grad_norm, skipped=f32(~ok),
                     nonfinite_loss=f32(bad_loss),
                     nonfinite_grads=f32(bad_grads))


def grad_step(state: TrainState, loss_fn, batch, *, schedule,
              grad_accum: int = 1, micro_batches: int = 1, weight_fn=None):
  """value_and_grad of `loss_fn(params, batch) -> (loss, metrics)` at
  state.params, then `apply_grads`; the body every stage's jitted step shares.

  With `micro_batches` = n > 1 the batch is cut into n strided slices of
  its leading axis (rows i, i + n, i + 2n, ...: under a data-parallel
  sharding every slice stays spread over all devices) and a `lax.scan`
  runs forward and backward on one slice at a time, so only one slice's
  activations are alive; the update is the same single optimizer step.
  Every loss here is a masked mean sum(x * w) / W over the batch, so the
  whole batch's loss is sum_j (W_j / W) loss_j, with W_j = `weight_fn(slice
  j)` (tokens, pairs or prompts, whatever the loss divides by): the
  gradient and loss are those of the full batch up to summation order.
  Metrics combine the same way, except counts (`COUNT_METRICS`, summed) and
  `*_min` / `*_max` (min / max): exact where a metric averages over the
  loss's own units (DPO's margin with reduce "pairs", GRPO's per-token
  metrics with aggregation "token"), else a weighted mean of per-slice means.

  Args:
    state: the train state.
    loss_fn: (params, batch) -> (loss f32[], metrics dict of f32[]).
    batch: dict of arrays with one leading axis B (prompts).
    schedule: the learning-rate schedule (reported as `lr`).
    grad_accum: batches per optimizer update across calls (`optax.MultiSteps`;
      only the reported lr uses it here).
    micro_batches: slices per call (must divide B); 1 = the whole batch.
    weight_fn: batch -> f32[] the loss's denominator on that batch; needed
      when micro_batches > 1.

  Returns:
    (new state, metrics): loss_fn's metrics plus `loss`, `lr` (the rate of
    this update: schedule(step // grad_accum)) and `apply_grads`'s.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if micro_batches == 1:
    (loss, metrics), grads = grad_fn(state.params, batch)
  else:
    if weight_fn is None:
      raise ValueError("micro_batches > 1 needs the loss's weight_fn")
    loss, metrics, grads = _accumulate(grad_fn, state.params,
                                       split_micro(batch, micro_batches),
                                       weight_fn)
  lr = schedule(state.step // grad_accum)
  state, update = state.apply_grads(grads, loss=loss)
  return state, dict(metrics, **update, loss=loss, lr=lr)


COUNT_METRICS = ("tokens", "pairs")


def split_micro(batch, n: int):
  """[B, ...] leaves -> [n, B / n, ...]: slice j holds rows j, j + n, ...

  Raises:
    ValueError: a leaf's leading axis is not divisible by n, or the leaves
      disagree on B.
  """
  sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(f"micro-batching needs one leading axis, got {sizes}")
  (b,) = sizes
  if b % n:
    raise ValueError(f"opt.micro_batches={n} does not divide the batch of "
                     f"{b} prompts")
  return jax.tree.map(
      lambda x: jnp.moveaxis(x.reshape((b // n, n) + x.shape[1:]), 1, 0),
      batch)


def merge_micro(x: jax.Array) -> jax.Array:
  """The inverse of `split_micro` for one array: [n, B / n, ...] -> [B, ...]."""
  return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


def map_micro(fn, batch, n: int):
  """fn(batch) computed on n strided slices one after another (lax.map),
  the [B, ...] result reassembled: fn's peak memory / n, the same values."""
  if n == 1:
    return fn(batch)
  return jax.tree.map(merge_micro, jax.lax.map(fn, split_micro(batch, n)))


def _accumulate(grad_fn, params, micro, weight_fn):
  """Weighted sum over the leading axis of `micro` of grad_fn's loss,
  metrics and gradients (see `grad_step`)."""
  w = jax.vmap(weight_fn)(micro).astype(jnp.float32)  # [n]
  total = jnp.sum(w)
  frac = jnp.where(total > 0, w / jnp.maximum(total, 1e-30), 0.0)

  def body(carry, xs):
    loss_acc, grads_acc = carry
    mb, f = xs
    (loss, metrics), grads = grad_fn(params, mb)
    grads_acc = jax.tree.map(lambda a, g: a + f * g.astype(a.dtype),
                             grads_acc, grads)
    return (loss_acc + f * loss, grads_acc), metrics

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (loss, grads), per = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                    (micro, frac))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

  def combine(name, v):
    if name in COUNT_METRICS:
      return jnp.sum(v)
    if name.endswith("_min"):
      return jnp.min(v)
    if name.endswith("_max"):
      return jnp.max(v)
    return jnp.sum(frac * v)
  return loss, {k: combine(k, v) for k, v in per.items()}, grads


def abstract_arrays(graphdef, param_shapes, tx: optax.GradientTransformation,
                    *, rng: jax.Array) -> dict:
  """`TrainState.create(...).arrays()` as jax.ShapeDtypeStruct, from param
  shapes (e.g. `llama.abstract_model(cfg)[1]`): a restore target that
  allocates nothing (add shardings with `checkpoint.abstract_like`)."""
  return jax.eval_shape(
      lambda p: TrainState.create(graphdef, p, tx, rng=rng).arrays(),
      param_shapes)


def make_schedule(*, learning_rate: float, warmup_steps: int,
                  total_steps: int, end_lr_ratio: float) -> optax.Schedule:
  """Linear warmup, then cosine decay; t counts optimizer updates from 0.

    t < w:           lr = peak (t + 1) / w   (the first update is not wasted
                     at lr 0, as with optax.warmup_cosine_decay_schedule)
    w <= t <= total: lr = end + (peak - end) (1 + cos(pi (t - w) / (total - w))) / 2
    t > total:       lr = end
  with peak = learning_rate, end = learning_rate * end_lr_ratio, w =
  warmup_steps (0: the cosine starts at the peak).
  """
  peak, end = float(learning_rate), float(learning_rate * end_lr_ratio)
  w = max(0, min(int(warmup_steps), int(total_steps)))
  span = max(int(total_steps) - w, 1)

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    warm = peak * (t + 1.0) / max(w, 1)
    frac = jnp.clip((t - w) / span, 0.0, 1.0)
    cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(t < w, warm, cosine)
  return schedule


def decay_mask(params) -> Any:
  """True on matrices (ndim >= 2): weight decay skips norms and biases."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


@functools.lru_cache(maxsize=16)
def make_optimizer(*, learning_rate: float, warmup_steps: int,
                   total_steps: int, end_lr_ratio: float = 0.1,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.0, clip_norm: float = 1.0,
                   grad_accum: int = 1, mu_dtype: str = "float32"
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with warmup + cosine, global-norm clipping and accumulation.

  Args:
    learning_rate, warmup_steps, total_steps, end_lr_ratio: `make_schedule`;
      steps count optimizer updates (total_steps = batches // grad_accum).
    b1, b2, eps: Adam.
    weight_decay: decoupled decay on matrices only (`decay_mask`).
    clip_norm: clip the (accumulated) gradient to this global norm; 0 = off.
    grad_accum: micro-batches averaged per update (`optax.MultiSteps`).
    mu_dtype: "float32" (optax's default: the params' dtype) or "bfloat16":
      Adam's first moment stored in bf16 (a name, not a dtype, so the
      arguments stay hashable for the cache). The update and the (f32)
      params are computed in f32; what bf16 costs, in optax 0.2.8: mu is
      rounded when stored and again in `b1 * mu`, computed in mu's dtype
      with b1 itself rounded to bf16 (0.9 -> 0.8984375), so for a steady
      gradient mu settles at (1 - b1) / (1 - bf16(b1)) of its f32 value
      (0.985 at b1 = 0.9; config_check refuses b1 where that is off by
      > 3 %, `mu_bf16_gain`). The second moment nu is not offered in bf16:
      at b2 = 0.999, bf16(b2) = 1.0 and nu could never shrink, a change of
      nu under 2^-9 .. 2^-8 of it is lost in any case, and nu sits in every
      step's denominator (benchmarks/README.md, "Half-precision state").

  Returns:
    (tx, schedule): schedule(update count) is the learning rate. Cached:
    equal arguments give the same objects, so a jitted step whose state
    holds `tx` (a static field) is not traced again in the same process.
  """
  if grad_accum < 1:
    raise ValueError(f"grad_accum {grad_accum} < 1")
  if mu_dtype not in MU_DTYPES:
    raise ValueError(f"mu_dtype {mu_dtype!r} not in {MU_DTYPES}")
  schedule = make_schedule(learning_rate=learning_rate,
                           warmup_steps=warmup_steps, total_steps=total_steps,
                           end_lr_ratio=end_lr_ratio)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
  parts.append(optax.adamw(
      schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
      mask=decay_mask,
      mu_dtype=jnp.bfloat16 if mu_dtype == "bfloat16" else None))
  tx = optax.chain(*parts)
  if grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=grad_accum)
  return tx, schedule


def mu_bf16_gain(b1: float) -> float:
  """(1 - b1) / (1 - bf16(b1)): where a bf16 mu settles for a steady
  gradient, as a share of the f32 mu (optax rounds b1 to mu's dtype in
  b1 * mu); 0 when bf16(b1) = 1 (mu never decays)."""
  rounded = float(jnp.asarray(b1, jnp.bfloat16))
  return (1.0 - b1) / (1.0 - rounded) if rounded < 1.0 else 0.0


def stage_updates(total_steps: int, *, updates_per_step: int = 1,
                  grad_accum: int = 1) -> int:
  """Optimizer updates in a stage: steps x updates per step (GRPO's inner
  iterations) / grad_accum (batches per update), at least 1."""
  return max(1, int(total_steps) * int(updates_per_step) // int(grad_accum))


def warmup_updates(updates: int, warmup_frac: float) -> int:
  """ceil(warmup_frac x updates) (float error never adds one)."""
  return int(math.ceil(float(warmup_frac) * updates - 1e-9))


def optimizer_from_config(opt, *, learning_rate: float, warmup_frac: float,
                          total_steps: int, updates_per_step: int = 1):
  """`make_optimizer` from an `opt` config block, with the stage's lr, warmup
  share and length (stage 1 takes them from `sft`, stage 2 from `opt`).

  The schedule counts optimizer updates: `total_steps` x `updates_per_step`
  (GRPO's inner iterations on one sampled batch) / `opt.grad_accum`, so it
  ends its cosine with the stage: the last update runs just above the
  floor, which is reached one past it (`make_schedule`), never halfway."""
  updates = stage_updates(total_steps, updates_per_step=updates_per_step,
                          grad_accum=opt.grad_accum)
  return make_optimizer(
      learning_rate=learning_rate,
      warmup_steps=warmup_updates(updates, warmup_frac),
      total_steps=updates,
      end_lr_ratio=opt.end_lr_ratio, b1=opt.b1, b2=opt.b2, eps=opt.eps,
      weight_decay=opt.weight_decay, clip_norm=opt.clip_norm,
      grad_accum=opt.grad_accum, mu_dtype=opt.get("mu_dtype", "float32"))


def check_finite(metrics: dict, *, step: int, policy: str) -> None:
  """Raises NonFiniteError under policy 'stop' if `metrics` (host values of
  one step, from `apply_grads`) flag a non-finite loss or gradient."""
  if policy not in NAN_POLICIES:
    raise ValueError(f"nan_policy {policy!r} not in {NAN_POLICIES}")
  if policy != "stop" or not metrics.get("skipped", 0.0):
    return
  what = ("loss" if metrics.get("nonfinite_loss", 0.0) else "gradient norm")
  value = metrics.get("loss") if what == "loss" else metrics.get("grad_norm")
  raise NonFiniteError(
      f"step {step}: non-finite {what} ({value}); the update was not applied. "
      "opt.nan_policy='stop' (use 'skip' to skip such updates and go on)")


def inject_nan(loss: jax.Array, step: jax.Array, nan_at_step: jax.Array
               ) -> jax.Array:
  """`loss`, made NaN at the step that brings `step` to nan_at_step (the test
  hook debug.nan_at_step). nan_at_step is traced (i32[]), so the hook never
  changes the compiled program; -1 (never) multiplies the loss by 1.0, which
  is exact."""
  return jnp.where(step + 1 == nan_at_step, jnp.nan, 1.0) * loss
