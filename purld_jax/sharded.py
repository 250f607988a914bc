"""The train step, the sampler and the scorer jitted under a mesh.

  mesh = sharding.mesh_from_config(config.mesh)
  p_sh = sharding.param_shardings(cfg, mesh)
  state = jax.device_put(state, sharded.state_shardings(state, p_sh))
  step = sharded.jit_train_step(functools.partial(dpo.train_step, ...),
                                sharded.state_shardings(state, p_sh),
                                ("params", "batch", "replicated"), mesh=mesh)
  state, metrics = step(state, ref_params, batch, nan_at_step)
  sample = sharded.jit_sampler(graphdef, p_sh, mesh=mesh, num_candidates=K,
                               sampling=sp, pad_id=tok.pad_id)
  cands = sample(params, prompt_tokens, prompt_mask, key, prompt_index)

Every function is `jax.jit` with explicit `in_shardings`/`out_shardings`,
traced inside `sharding.use_rules(mesh, rules)` so the model's activation
constraints apply. The choices:

- Parameters follow the rules (`sharding.param_shardings`): with the
  default rules embed on fsdp, heads / mlp on tensor, and the embedding
  table / lm_head split on vocab over (fsdp, tensor), whole on their
  hidden dim (vocab-parallel, see sharding.py).
- Optimizer state mirrors the parameters: each leaf of the optimizer state
  that corresponds to a parameter (Adam's mu and nu, MultiSteps' gradient
  accumulator) gets that parameter's sharding (`optax.tree_map_params`);
  counters are replicated. The step and the rng are replicated.
- The train state is donated (argument 0): its buffers are reused for the
  new state, so a step holds one copy of params and optimizer state.
- Batches: every array's leading axis is the batch (B prompts, or rows) and
  is the logical `act_batch` (default rules: over ('data', 'fsdp')); every
  other axis is whole on each device. In particular the K candidate (or M
  member) axis of [B, K, T] arrays is NOT sharded: a prompt's candidates
  live with their prompt, so the scorer runs the prompt once and its K
  responses attend to its keys and values without moving them between
  devices (`scoring.response_logps`, the sampler's shared prefix). An array
  whose leading axis does not divide the data x fsdp devices is replicated
  (as `sharding.spec` does for parameters): choose B as a multiple of
  data * fsdp.
- Sampler: the prompts' keys and values [B, G, P, H] and each row's own
  cache [B * K, G, ...] are split like the batch on the rows and like
  kv_heads on the heads (logical cache_batch / cache_heads; constrained in
  `prefix_cache.prefill`); rows b * K .. b * K + K - 1 are contiguous, so with
  B divisible by data * fsdp a prompt's K rows sit on its device. The cache
  is created and consumed inside the jit: nothing to donate.
- Metrics and other outputs of the train step are replicated.

Host data and global arrays (`put`, `put_batch`, `to_host`): every process
holds the WHOLE batch on its host (the trainers read the global batch on
every process, identically; anchors are broadcast from process 0), so
`jax.make_array_from_process_local_data` is called with the global shape and
each process transfers only its devices' shards; outputs come back whole
on every process (`multihost_utils.process_allgather`). Shapes then agree
across processes by construction (bucket lengths, anchor lengths, compacted
DPO members all come from the same host data); the price is host work
(tokenising, ranking glue, decoding) repeated on every process. On one
process these are `device_put` and `device_get`. `Jitted.__call__` puts
host arguments (numpy) with their shardings itself.

Argument kinds of `jit_train_step` / `jit_fn`: "state" (a TrainState),
"params" (a pure-dict params tree), "batch" (a pytree of batch-leading
arrays) and "replicated" (scalars, keys). Batch shardings depend on the
shapes (divisibility), so a `Jitted` keeps one `jax.jit` per batch shape,
as jit itself compiles once per shape.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from purld_jax import hostmem
from purld_jax import sharding
from purld_jax.train import state as state_lib

KINDS = ("state", "params", "batch", "replicated", "frozen")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_shardings(tree, mesh: Mesh, rules=sharding.DEFAULT_RULES):
  """NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs): the
  leading axis by the rule of act_batch, other axes whole; scalars
  replicated."""
  def one(x):
    shape = getattr(x, "shape", ())
    if not shape:
      return replicated(mesh)
    names = ("act_batch",) + (None,) * (len(shape) - 1)
    return sharding.named(mesh, names, rules, shape)
  return jax.tree.map(one, tree)


def opt_state_shardings(tx: optax.GradientTransformation, opt_state,
                        param_sh, mesh: Mesh):
  """Shardings of `opt_state` (arrays or abstract): leaves that mirror a
  parameter take its sharding, the rest (counters) are replicated."""
  return optax.tree_map_params(
      tx, lambda _, sh: sh, opt_state, param_sh,
      transform_non_params=lambda _: replicated(mesh))


def state_shardings(state: state_lib.TrainState, param_sh, frozen_sh=None
                    ) -> state_lib.TrainState:
  """A TrainState whose leaves are the NamedShardings of `state`'s (which
  may be abstract, e.g. `jax.eval_shape` of `TrainState.create`); with
  LoRA `param_sh` are the adapters' and `frozen_sh` the frozen base's."""
  mesh = jax.tree.leaves(param_sh)[0].mesh
  return state.replace(
      params=param_sh,
      opt_state=opt_state_shardings(state.tx, state.opt_state, param_sh, mesh),
      step=replicated(mesh), rng=replicated(mesh), frozen=frozen_sh)


def put(tree, shardings):
  """Host values that every process holds in full -> global jax.Arrays with
  `shardings` (a matching tree, or one sharding for all leaves). jax.Arrays
  already carrying their sharding are kept; others are resharded."""
  def one(x, s):
    if isinstance(x, jax.Array):
      if x.sharding == s:
        return x
      if s.is_fully_addressable or not x.is_fully_addressable:
        return jax.device_put(x, s)
      # A process-local array (e.g. `jax.random.key(0)`, the same on every
      # process) onto a mesh spanning processes: device_put cannot reach
      # other processes' devices, so it goes through the host like numpy.
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(
            one(np.asarray(jax.random.key_data(x)), s),
            impl=jax.random.key_impl(x))
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(s, x, x.shape)
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, shardings), tree)
  return jax.tree.map(one, tree, shardings)


def put_batch(tree, mesh: Mesh, rules=sharding.DEFAULT_RULES):
  """`put` with `batch_shardings`: the leading axis split over data x fsdp."""
  return put(tree, batch_shardings(tree, mesh, rules))


def to_host(tree):
  """numpy of (global) arrays, whole on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def barrier(name: str) -> None:
  """Every process waits here (after process 0 wrote a shared file); a no-op
  on one process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def on_host(fn: Callable) -> Callable:
  """`fn` whose outputs come back as host numpy (`to_host`)."""
  return lambda *args: to_host(fn(*args))


class Jitted:
  """`fn` under `jax.jit` with the shardings of its argument kinds.

  Attributes:
    fn: the pure function.
    kinds: one of KINDS per positional argument.
    mesh, rules: the mesh and logical rules.
    fixed: shardings of the "state" and "params" kinds.
    out: "batch" (outputs sharded like a batch, from their shapes) or a
      sharding pytree prefix of the outputs.
    donate: positional arguments donated.
  """

  def __init__(self, fn: Callable, kinds: Sequence[str], *, mesh: Mesh,
               rules=sharding.DEFAULT_RULES, fixed: dict | None = None,
               out: Any = "batch", donate: Sequence[int] = ()):
    bad = [k for k in kinds if k not in KINDS]
    if bad:
      raise ValueError(f"argument kinds {bad} not in {KINDS}")
    self.fn, self.kinds, self.mesh = fn, tuple(kinds), mesh
    self.rules, self.fixed = tuple(rules), dict(fixed or {})
    self.out, self.donate = out, tuple(donate)
    self._jits: dict = {}
    self._compiled: dict = {}

  def _traced(self, *args):
    with sharding.use_rules(self.mesh, self.rules):
      return self.fn(*args)

  def in_shardings(self, *args) -> tuple:
    """The in_shardings for these arguments (arrays or abstract)."""
    out = []
    for kind, a in zip(self.kinds, args, strict=True):
      if kind == "batch":
        out.append(batch_shardings(a, self.mesh, self.rules))
      elif kind == "replicated":
        out.append(replicated(self.mesh))
      else:
        out.append(self.fixed[kind])
    return tuple(out)

  def jit(self, *args):
    """The `jax.jit` for the batch shapes of these arguments (cached)."""
    in_sh = self.in_shardings(*args)
    key = tuple((jax.tree.structure(a), tuple(
        (x.shape, str(x.dtype)) for x in jax.tree.leaves(a)))
                for kind, a in zip(self.kinds, args) if kind == "batch")
    if key not in self._jits:
      out_sh = self.out
      if isinstance(out_sh, str):
        with sharding.use_rules(self.mesh, self.rules):
          shapes = jax.eval_shape(self.fn, *args)
        out_sh = batch_shardings(shapes, self.mesh, self.rules)
      self._jits[key] = jax.jit(self._traced, in_shardings=in_sh,
                                out_shardings=out_sh,
                                donate_argnums=self.donate)
    return self._jits[key]

  def __call__(self, *args):
    """Runs the jit; host (numpy) arguments are put with their shardings.

    The first call for given argument shapes compiles ahead of the run and
    then gives the compiler's freed memory back (`hostmem.release`), so the
    first run's temporaries do not stack on the compiler's high-water mark
    (SmolLM2's GRPO step: 0.5 GB less peak RSS)."""
    in_sh = self.in_shardings(*args)
    args = tuple(put(a, sh) for a, sh in zip(args, in_sh))
    key = tuple((jax.tree.structure(a), tuple(
        (x.shape, str(x.dtype)) for x in jax.tree.leaves(a))) for a in args)
    compiled = self._compiled.get(key)
    if compiled is None:
      compiled = self.jit(*args).lower(*args).compile()
      hostmem.release()
      self._compiled[key] = compiled
      if os.environ.get("PURLD_MEMORY_REPORT"):
        _memory_report(self, compiled)
    return compiled(*args)

  def lower(self, *args):
    """`jax.jit(...).lower(*args)`: args may be jax.ShapeDtypeStruct (AOT)."""
    return self.jit(*args).lower(*args)


def _memory_report(jitted, compiled) -> None:
  """With PURLD_MEMORY_REPORT set, the sizes XLA assigned to a compiled
  program (arguments, outputs, temporaries, donated-and-reused), printed
  once per program and argument shapes."""
  ma = compiled.memory_analysis()
  gb = lambda n: f"{n / 2**30:.2f}"
  fn_ = getattr(jitted.fn, "func", jitted.fn)  # a functools.partial's own
  name = getattr(fn_, "__qualname__", "?")
  print(f"[memory] {name} args {gb(ma.argument_size_in_bytes)} GiB, out "
        f"{gb(ma.output_size_in_bytes)}, temp {gb(ma.temp_size_in_bytes)}, "
        f"alias {gb(ma.alias_size_in_bytes)}", file=sys.stderr, flush=True)


def jit_train_step(step_fn: Callable, state_sh: state_lib.TrainState,
                   kinds: Sequence[str], *, mesh: Mesh,
                   rules=sharding.DEFAULT_RULES, donate: bool = True
                   ) -> Jitted:
  """A train step `step_fn(state, *args) -> (state, metrics)` under `mesh`.

  Args:
    step_fn: e.g. `functools.partial(dpo.train_step, beta=..., ...)`.
    state_sh: `state_shardings(state, param_sh)`.
    kinds: kinds of the arguments after the state, e.g. ("params", "batch",
      "replicated") for DPO / LDL (ref_params, batch, nan_at_step) or
      ("batch", "replicated") for SFT / GRPO.
    donate: donate the state (argument 0).

  With a frozen base (LoRA: `state_sh.frozen` is not None) the step takes
  the state's `frozen` as a separate argument that is neither donated nor
  returned (`FrozenStep`): the base stays one set of buffers, which the
  caller may also read (the reference of stage 2) while steps run.
  """
  if state_sh.frozen is not None:
    return FrozenStep(step_fn, state_sh, kinds, mesh=mesh, rules=rules,
                      donate=donate)
  return Jitted(step_fn, ("state",) + tuple(kinds), mesh=mesh, rules=rules,
                fixed=dict(state=state_sh, params=state_sh.params),
                out=(state_sh, replicated(mesh)),
                donate=(0,) if donate else ())


class FrozenStep:
  """`jit_train_step` of a state with a frozen base: step_fn(state, *args)
  jitted as f(state without frozen, frozen, *args), the state donated, the
  frozen base not; the returned state gets the caller's `frozen` back."""

  def __init__(self, step_fn, state_sh, kinds, *, mesh, rules, donate):
    def body(state, frozen, *args):
      new, metrics = step_fn(state.replace(frozen=frozen), *args)
      return new.replace(frozen=None), metrics
    bare = state_sh.replace(frozen=None)
    self.jitted = Jitted(body, ("state", "frozen") + tuple(kinds), mesh=mesh,
                         rules=rules, fixed=dict(state=bare,
                                                 params=state_sh.params,
                                                 frozen=state_sh.frozen),
                         out=(bare, replicated(mesh)),
                         donate=(0,) if donate else ())

  def __call__(self, state, *args):
    new, metrics = self.jitted(state.replace(frozen=None), state.frozen, *args)
    return new.replace(frozen=state.frozen), metrics

  def lower(self, state, *args):
    return self.jitted.lower(state.replace(frozen=None), state.frozen, *args)


def jit_fn(fn: Callable, param_sh, kinds: Sequence[str], *, mesh: Mesh,
           rules=sharding.DEFAULT_RULES) -> Jitted:
  """`fn(params, *args)` with batch-leading outputs (a scorer, the sampler).

  Args:
    fn: pure, e.g. `lambda params, tokens, mask: scoring.token_logps(
      nnx.merge(graphdef, params), tokens, mask)`.
    param_sh: `sharding.param_shardings(cfg, mesh, rules)`.
    kinds: kinds of the arguments after the params.
  """
  return Jitted(fn, ("params",) + tuple(kinds), mesh=mesh, rules=rules,
                fixed=dict(params=param_sh))


def jit_sampler(graphdef, param_sh, *, mesh: Mesh,
                rules=sharding.DEFAULT_RULES, **sample_kw) -> Jitted:
  """`sampling.sample` under `mesh`: f(params, prompt_tokens, prompt_mask,
  key, prompt_index[, pixel_values, pixel_mask]) -> Candidates sharded on B
  (the pixels of a vision-language student's image prompts: [B, I, ...],
  split like the batch).

  `sample_kw` are its static arguments (num_candidates, sampling, pad_id).
  The unjitted body is used: the module-level jit's trace cache does not
  know the mesh of `sharding.use_rules`.
  """
  from purld_jax import sampling  # pylint: disable=g-import-not-at-top
  body = sampling.sample.__wrapped__

  def fn(params, prompt_tokens, prompt_mask, key, prompt_index):
    return body(graphdef, params, prompt_tokens, prompt_mask, key,
                prompt_index=prompt_index, **sample_kw)

  def fn_images(params, prompt_tokens, prompt_mask, key, prompt_index,
                pixel_values, pixel_mask):
    return body(graphdef, params, prompt_tokens, prompt_mask, key,
                prompt_index=prompt_index, pixel_values=pixel_values,
                pixel_mask=pixel_mask, **sample_kw)
  kinds = ("batch", "batch", "replicated", "batch")
  text = jit_fn(fn, param_sh, kinds, mesh=mesh, rules=rules)
  images = jit_fn(fn_images, param_sh, kinds + ("batch", "batch"), mesh=mesh,
                  rules=rules)
  return WithImages(text, images)


class WithImages:
  """Two `Jitted` of one function: `text` called with the usual arguments,
  `images` when two more (pixel_values, pixel_mask) follow them."""

  def __init__(self, text: Jitted, images: Jitted, n_text: int = 5):
    self.text, self.images, self.n_text = text, images, n_text

  def _pick(self, args) -> Jitted:
    return self.text if len(args) == self.n_text else self.images

  def __call__(self, *args):
    return self._pick(args)(*args)

  def lower(self, *args):
    return self._pick(args).lower(*args)


def jit_scorers(graphdef, param_sh, *, mesh: Mesh,
                rules=sharding.DEFAULT_RULES, vocab_chunk: int | None = None
                ) -> Callable:
  """The four scorer functions of `self_scoring.Scorers` jitted under
  `mesh`.

  Returns:
    bind(params) -> self_scoring.Scorers whose functions take host arrays (rows
    split over data x fsdp) and return host numpy (`to_host`).
  """
  from purld_jax import scoring  # pylint: disable=g-import-not-at-top
  from purld_jax import self_scoring  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  merge = lambda p: nnx.merge(graphdef, p)
  fns = dict(
      token_logps=(lambda p, t, m: scoring.token_logps(
          merge(p), t, m, vocab_chunk=vocab_chunk), 2),
      last_logps=(lambda p, t, m: scoring.last_logps(merge(p), t, m), 2),
      response_logps=(lambda p, pt, pm, r, rm: scoring.response_logps(
          merge(p), pt, pm, r, rm, vocab_chunk=vocab_chunk), 4),
      response_next_logps=(lambda p, pt, pm, r, rm:
                           scoring.response_next_logps(merge(p), pt, pm, r,
                                                       rm), 4))
  jitted = {name: jit_fn(fn, param_sh, ("batch",) * n, mesh=mesh, rules=rules)
            for name, (fn, n) in fns.items()}
  # prefixes of image prompts (ranking.IMAGE_SCHEMES' model rows): their
  # pixels follow, split like the prefixes
  jitted["response_logps"] = WithImages(jitted["response_logps"], jit_fn(
      lambda p, pt, pm, r, rm, pv, pxm: scoring.response_logps(
          merge(p), pt, pm, r, rm, vocab_chunk=vocab_chunk, pixel_values=pv,
          pixel_mask=pxm), param_sh, ("batch",) * 6, mesh=mesh, rules=rules))
  jitted["response_next_logps"] = WithImages(
      jitted["response_next_logps"], jit_fn(
          lambda p, pt, pm, r, rm, pv, pxm: scoring.response_next_logps(
              merge(p), pt, pm, r, rm, pixel_values=pv, pixel_mask=pxm),
          param_sh, ("batch",) * 6, mesh=mesh, rules=rules))

  def bind(params) -> self_scoring.Scorers:
    return self_scoring.Scorers(**{
        name: (lambda j: lambda *a: to_host(j(params, *a)))(j)
        for name, j in jitted.items()})
  return bind
