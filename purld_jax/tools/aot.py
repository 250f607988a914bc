r"""Lowers and compiles the config's train step ahead of time, on abstract
shapes, under the config's mesh: proof that the shardings are valid for a
slice, without the slice and without weights.

  python -m purld_jax.tools.aot --config=configs/qwen25_1p5b_v5e16.py --devices=16
  python -m purld_jax.tools.aot --config=configs/llama31_8b_v5p64.py --devices=32

--devices=N fakes N CPU devices (XLA_FLAGS
--xla_force_host_platform_device_count=N, set before JAX starts); the mesh
(`config.mesh`) must use all N. Only the architecture is read
(`student.architecture`: `model.path/config.json`). Inputs are
`jax.ShapeDtypeStruct`s carrying their shardings (`sharded.py`): the
train state (params, optimizer state, step, rng), the reference params
(DPO, LDL) and one batch of the shapes the config implies (`shapes`).
With `model.lora.rank` > 0 the step is the stages' LoRA step
(`sharded.FrozenStep`): the state's params and optimizer state are the
adapters', the frozen base a separate undonated argument, and the
reference zero adapters over that base (train/pu_rl.py `lora_views`).
Prints the memory estimate (`tools/memory.py`) next to XLA's
`memory_analysis()` of the compiled step.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp

from purld_jax import sharded
from purld_jax import sharding
from purld_jax.models import llama
from purld_jax.models import lora
from purld_jax.train import state as state_lib
from purld_jax.train import student as student_lib

_RECIPES = ("sft", "dpo", "grpo", "ldl")
_WITH_REF = ("dpo", "ldl")  # steps that take the reference params


@dataclasses.dataclass(frozen=True)
class Shapes:
  """One step's batch sizes (structs.py letters).

  Attributes:
    recipe: sft | dpo | grpo | ldl.
    b: prompts per step (all processes).
    k: candidates per prompt.
    p: prompt tokens (padded).
    t: response tokens (padded).
    u: members per prompt the step scores: 2 for DPO best-vs-worst after
      `dpo.compact`, K + 1 for other pair rules, K for GRPO, K or K + 1 for
      LDL (`pu.include_anchor`); SFT: 1 row of p + t tokens.
  """

  recipe: str
  b: int
  k: int
  p: int
  t: int
  u: int


def shapes(config) -> Shapes:
  """The batch shapes a config implies (its recipe's step)."""
  recipe, k = config.recipe, config.sampling.num_candidates
  p = config.data.max_prompt_len
  if recipe == "sft":
    return Shapes("sft", config.sft.batch_size, 1, p,
                  config.sft.max_response_len + 1, 1)
  if recipe == "dpo":
    u = 2 if config.preference.pairs == "best_vs_worst" else k + 1
  elif recipe == "ldl":
    u = k + 1 if config.pu.include_anchor else k
  else:
    u = k
  return Shapes(recipe, config.rl.batch_size, k, p,
                config.sampling.max_new_tokens, u)


def abstract_batch(s: Shapes) -> dict:
  """jax.ShapeDtypeStruct per key of the recipe's `build_batch`."""
  sds = jax.ShapeDtypeStruct
  i32, f32 = jnp.int32, jnp.float32
  if s.recipe == "sft":
    row = (s.b, s.p + s.t)
    return dict(tokens=sds(row, i32), mask=sds(row, bool),
                loss_mask=sds(row, bool))
  prompt = dict(prompt_tokens=sds((s.b, s.p), i32),
                prompt_mask=sds((s.b, s.p), bool))
  members = (s.b, s.u, s.t)
  if s.recipe == "dpo":
    n = 1 if s.u == 2 else s.u * (s.u - 1) // 2
    return dict(prompt, members=sds(members, i32),
                member_mask=sds(members, bool), chosen=sds((s.b, n), i32),
                rejected=sds((s.b, n), i32), pair_mask=sds((s.b, n), bool))
  if s.recipe == "grpo":
    return dict(prompt, responses=sds(members, i32),
                response_mask=sds(members, bool),
                old_logps=sds(members, f32), advantages=sds((s.b, s.u), f32),
                ref_logps=sds(members, f32))
  return dict(prompt, members=sds(members, i32),
              token_mask=sds(members, bool),
              label_dist=sds((s.b, s.u), f32),
              member_mask=sds((s.b, s.u), bool))


def _recipe(name: str):
  if name not in _RECIPES:
    raise ValueError(f"recipe {name!r} not in {_RECIPES}")
  from purld_jax.train import dpo, grpo, ldl, sft  # pylint: disable=g-import-not-at-top
  return dict(sft=sft, dpo=dpo, grpo=grpo, ldl=ldl)[name]


def _with_sharding(abstract, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, shardings)


def lower_train_step(config, mesh, rules=sharding.DEFAULT_RULES):
  """(`jax.stages.Lowered`, Shapes) of the config's step under `mesh`."""
  cfg = student_lib.config_architecture(config.model)
  s = shapes(config)
  recipe = _recipe(s.recipe)
  graphdef, param_shapes = llama.abstract_model(cfg)
  tx, schedule = state_lib.optimizer_from_config(
      config.opt, learning_rate=config.opt.learning_rate,
      warmup_frac=config.opt.warmup_frac, total_steps=config.rl.steps,
      updates_per_step=(config.loss.grpo.inner_iterations
                        if config.recipe == "grpo" else 1))
  p_sh = sharding.param_shardings(cfg, mesh, rules)
  frozen, frozen_sh = None, None
  if cfg.lora is not None:  # trained: the adapters; the base frozen
    param_shapes, frozen = lora.split(param_shapes)
    p_sh, frozen_sh = lora.split(p_sh)
  state = jax.eval_shape(lambda p, f: state_lib.TrainState.create(
      graphdef, p, tx, rng=jax.random.PRNGKey(0), frozen=f),
                         param_shapes, frozen)
  state_sh = sharded.state_shardings(state, p_sh, frozen_sh)
  kw = dict(schedule=schedule, grad_accum=config.opt.grad_accum,
            vocab_chunk=config.model.vocab_chunk or None)
  if s.recipe != "sft":
    kw.update(recipe.step_kwargs(config))
  fn = functools.partial(recipe.train_step, **kw)
  batch = abstract_batch(s)
  nan = jax.ShapeDtypeStruct((), jnp.int32)
  if s.recipe in _WITH_REF:
    # LoRA: the reference is zero adapters over the frozen base.
    ref_shapes = param_shapes  # rl.reference_dtype: the copy's storage
    if config.rl.get("reference_dtype", "float32") == "bfloat16":
      ref_shapes = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), param_shapes)
    kinds, args = ("params", "batch", "replicated"), (
        _with_sharding(ref_shapes, p_sh), batch, nan)
  else:
    kinds, args = ("batch", "replicated"), (batch, nan)
  step = sharded.jit_train_step(fn, state_sh, kinds, mesh=mesh, rules=rules)
  return step.lower(_with_sharding(state, state_sh), *args), s, cfg


def compile_train_step(config, mesh, rules=sharding.DEFAULT_RULES):
  """(compiled, seconds to lower and compile, Shapes, LlamaConfig)."""
  t0 = time.perf_counter()
  lowered, s, cfg = lower_train_step(config, mesh, rules)
  compiled = lowered.compile()
  return compiled, time.perf_counter() - t0, s, cfg


def fake_devices(n: int) -> None:
  """Makes JAX see n CPU devices; must run before JAX starts a backend."""
  flags = os.environ.get("XLA_FLAGS", "")
  flags = " ".join(f for f in flags.split()
                   if "xla_force_host_platform_device_count" not in f)
  os.environ["XLA_FLAGS"] = (
      f"{flags} --xla_force_host_platform_device_count={n}").strip()
  jax.config.update("jax_platforms", "cpu")


def main(argv) -> None:
  from purld_jax.tools import memory  # pylint: disable=g-import-not-at-top
  del argv
  config = memory.FLAGS.config
  if memory.FLAGS.devices:
    fake_devices(memory.FLAGS.devices)
  mesh = sharding.mesh_from_config(config.mesh)
  print(f"mesh {dict(mesh.shape)} on {jax.device_count()} "
        f"{jax.devices()[0].platform} devices")
  compiled, seconds, s, cfg = compile_train_step(config, mesh)
  print(f"compiled the {s.recipe} train step in {seconds:.1f} s: "
        f"{dataclasses.asdict(s)}")
  print(memory.table(memory.estimate_from_config(config, cfg, mesh),
                     compiled.memory_analysis()))
  sys.stdout.flush()


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from purld_jax.tools import memory as _memory  # noqa: F401  (defines flags)
  app.run(main)
