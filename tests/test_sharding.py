"""Sharded forward equals single-device; parameter shardings follow the rules.

conftest.py gives the CPU 8 devices (XLA_FLAGS), as on a small pod slice.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from purld_jax import sharded
from purld_jax import sharding
from purld_jax.models import llama
from purld_jax.train import sft
from purld_jax.train import state as state_lib

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]

pytestmark = pytest.mark.skipif(jax.device_count() < 8,
                                reason="needs 8 (fake) devices")


def _cfg():
  # every sharded dimension divisible by 8: heads 8, kv heads 4 -> on tensor
  # axis of 2 they split; embed 64 splits over fsdp 8.
  return llama.tiny_config(hidden_size=64, num_heads=8, num_kv_heads=4,
                           head_dim=8, intermediate_size=128, vocab_size=256)


def test_make_mesh_infers_one_axis():
  mesh = sharding.make_mesh((2, -1, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match=r"needs 4 devices, found 8"):
    sharding.make_mesh((2, 2, 1))
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.make_mesh((-1, -1, 2))


def test_spec_by_hand():
  mesh = sharding.make_mesh((2, 2, 2))
  rules = sharding.DEFAULT_RULES
  assert sharding.spec(("embed", "q_heads", "head_dim"), rules, mesh,
                       (64, 8, 8)) == P("fsdp", "tensor", None)
  # 3 kv heads do not split over tensor=2: replicated on that dimension.
  assert sharding.spec(("embed", "kv_heads", "head_dim"), rules, mesh,
                       (64, 3, 8)) == P("fsdp", None, None)
  assert sharding.spec(("act_batch", "act_len"), rules, mesh,
                       (4, 5)) == P(("data", "fsdp"), None)
  # a size-1 mesh axis is dropped from the spec
  mesh1 = sharding.make_mesh((8, 1, 1))
  assert sharding.spec(("vocab", "embed"), rules, mesh1,
                       (256, 64)) == P(None, None)
  with pytest.raises(KeyError, match="'nope' has no rule"):
    sharding.spec(("nope",), rules)


def _vocab_axes(shape):
  """The vocab dim's spec entry on mesh `shape`: (fsdp, tensor), size-1
  axes dropped."""
  axes = tuple(a for a, n in zip(("fsdp", "tensor"), shape[1:]) if n > 1)
  return axes[0] if len(axes) == 1 else axes or None


@pytest.mark.parametrize("shape", MESHES)
def test_param_shardings_follow_rules(shape):
  mesh = sharding.make_mesh(shape)
  sh = sharding.param_shardings(_cfg(), mesh)
  tensor = "tensor" if shape[2] > 1 else None
  fsdp = "fsdp" if shape[1] > 1 else None
  assert sh["layers"][0]["attn"]["q_proj"].spec == P(fsdp, tensor, None)
  assert sh["layers"][1]["mlp"]["down_proj"].spec == P(tensor, fsdp)
  assert sh["embed"].spec == P(_vocab_axes(shape), None)
  assert sh["lm_head"].spec == P(None, _vocab_axes(shape))
  assert sh["final_norm"]["scale"].spec == P(fsdp)


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_forward_equals_single_device(shape):
  cfg = _cfg()
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  pure = nnx.to_pure_dict(params)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 256, (8, 12)), jnp.int32)
  mask = jnp.asarray(np.arange(12)[None, :] >= rng.integers(0, 6, (8, 1)))
  want = np.asarray(model(tokens, attention_mask=mask))

  mesh = sharding.make_mesh(shape)
  p_sh = sharding.param_shardings(cfg, mesh)
  batch_sh = sharding.named(mesh, ("act_batch", "act_len"), shape=(8, 12))
  out_sh = sharding.named(mesh, ("act_batch", "act_len", "act_vocab"),
                          shape=(8, 12, 256))

  def fwd(params, tokens, mask):
    with sharding.use_rules(mesh):
      return nnx.merge(graphdef, params)(tokens, attention_mask=mask)

  f = jax.jit(fwd, in_shardings=(p_sh, batch_sh, batch_sh),
              out_shardings=out_sh)
  placed = jax.device_put(pure, p_sh)
  assert placed["layers"][0]["mlp"]["up_proj"].sharding == \
      p_sh["layers"][0]["mlp"]["up_proj"]
  got = f(placed, jax.device_put(tokens, batch_sh),
          jax.device_put(mask, batch_sh))
  assert isinstance(got.sharding, NamedSharding)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_embedding_table_is_vocab_parallel():
  """The table is split on V over (fsdp, tensor), whole on D; the layers'
  weights keep embed on fsdp."""
  mesh = sharding.make_mesh((2, 2, 2))
  sh = sharding.param_shardings(_cfg().replace(tie_word_embeddings=True),
                                mesh)
  assert "lm_head" not in sh
  assert sh["embed"].spec == P(("fsdp", "tensor"), None)
  assert sh["layers"][0]["mlp"]["up_proj"].spec == P("fsdp", "tensor")
  assert sharding.spec(("logits_batch", "act_len", "act_vocab"),
                       sharding.DEFAULT_RULES, mesh, (8, 5, 256)) == P(
                           "data", None, ("fsdp", "tensor"))


# The layout before the table was vocab-parallel: V on tensor, D on fsdp,
# logits split on rows over (data, fsdp) and V on tensor.
_D_SPLIT_RULES = tuple(
    {"vocab": ("vocab", "tensor"), "table_embed": ("table_embed", "fsdp"),
     "act_vocab": ("act_vocab", "tensor"),
     "logits_batch": ("logits_batch", ("data", "fsdp"))}.get(name, (name, a))
    for name, a in sharding.DEFAULT_RULES)


def _whole_table_collectives(rules) -> list[str]:
  """Collectives of the tied model's SFT step on mesh (1, 4, 2) whose
  result holds more than one device's share of the f32[1024, 64] table:
  [1024 / s, 64] or its transpose, s = 1, 2, 4 (no other weight has 1024,
  512 or 256 rows)."""
  cfg = _cfg().replace(tie_word_embeddings=True, num_layers=1,
                       vocab_size=1024)
  graphdef, shapes = llama.abstract_model(cfg)
  tx, schedule = state_lib.make_optimizer(learning_rate=1e-3, warmup_steps=0,
                                          total_steps=10)
  state = jax.eval_shape(lambda p: state_lib.TrainState.create(
      graphdef, p, tx, rng=jax.random.PRNGKey(0)), shapes)
  mesh = sharding.make_mesh((1, 4, 2))
  state_sh = sharded.state_shardings(
      state, sharding.param_shardings(cfg, mesh, rules))
  step = sharded.jit_train_step(
      functools.partial(sft.train_step, schedule=schedule), state_sh,
      ("batch", "replicated"), mesh=mesh, rules=rules)
  sds = jax.ShapeDtypeStruct
  batch = dict(tokens=sds((8, 12), jnp.int32), mask=sds((8, 12), bool),
               loss_mask=sds((8, 12), bool))
  state = jax.tree.map(lambda x, s: sds(x.shape, x.dtype, sharding=s),
                       state, state_sh)
  hlo = step.lower(state, batch, sds((), jnp.int32)).compile().as_text()
  return re.findall(r"= f32\[(?:(?:1024|512|256),64|64,(?:1024|512|256))\]"
                    r"\S* (?:all-gather|all-reduce)\S*\(", hlo)


def test_train_step_never_gathers_the_whole_table():
  """XLA keeps the vocab-parallel table in its shards through the lookup,
  the logits and their gradients (a masked local gather, logits against
  the local rows); with D split over fsdp instead it gathers the whole
  table (and all-reduces its whole gradient), which this check sees."""
  assert _whole_table_collectives(sharding.DEFAULT_RULES) == []
  assert _whole_table_collectives(_D_SPLIT_RULES)


def test_jitted_compiles_once_per_shapes_and_releases_after(monkeypatch):
  """Jitted compiles ahead of a shape's first run, gives the compiler's
  memory back once per compile (hostmem.release), and runs the compiled
  program: the values are jax.jit's."""
  released = []
  monkeypatch.setattr(sharded.hostmem, "release",
                      lambda: released.append(1))
  mesh = sharding.make_mesh((8, 1, 1))
  fn = sharded.Jitted(lambda w, x: x @ w, ("replicated", "batch"),
                      mesh=mesh)
  w = np.arange(6, dtype=np.float32).reshape(3, 2)
  x8 = np.ones((8, 3), np.float32)
  np.testing.assert_allclose(fn(w, x8), x8 @ w)
  np.testing.assert_allclose(fn(w, 2 * x8), 2 * x8 @ w)
  assert (len(fn._compiled), len(released)) == (1, 1)
  x16 = np.ones((16, 3), np.float32)
  np.testing.assert_allclose(fn(w, x16), x16 @ w)
  assert (len(fn._compiled), len(released)) == (2, 2)
