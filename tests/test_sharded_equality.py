"""Train steps, sampler and scorer under a mesh equal one device.

conftest.py gives the CPU 8 devices. Every mesh runs the same functions as
the single-device reference (plain `jax.jit`, no mesh): results within 1e-5
(f32), sampled tokens identical, and the updated state's shardings are what
the rules say. Dimensions divide by 8 where they are sharded (batch 8,
heads 8, kv heads 4, embed 64, mlp 128, vocab 256).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from numpy.testing import assert_allclose, assert_array_equal

from purld_jax import sampling
from purld_jax import scoring
from purld_jax import sharded
from purld_jax import sharding
from purld_jax.models import llama
from purld_jax.train import dpo
from purld_jax.train import sft
from purld_jax.train import state as state_lib

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
B, P_LEN, M, T, K = 8, 8, 2, 6, 2
ATOL = 1e-5

pytestmark = pytest.mark.skipif(jax.device_count() < 8,
                                reason="needs 8 (fake) devices")


def _cfg():
  # one layer: every layer is sharded alike, and compiles stay short.
  return llama.tiny_config(hidden_size=64, num_heads=8, num_kv_heads=4,
                           head_dim=8, intermediate_size=128, vocab_size=256,
                           num_layers=1)


def _params(seed):
  """(graphdef, params): N(0, 0.02^2) matrices, unit norm scales, drawn on
  the host (JAX's initialisers compile op by op: seconds on CPU)."""
  graphdef, shapes = llama.abstract_model(_cfg())
  rng = np.random.default_rng(seed)
  init = lambda x: (0.02 * rng.standard_normal(x.shape) if len(x.shape) > 1
                    else np.ones(x.shape)).astype(np.float32)
  return graphdef, jax.tree.map(init, shapes)


def _batches():
  """Host arrays: DPO (prompts [B, P], members [B, M, T], one pair per
  prompt: member 0 over member 1) and SFT (rows [B, P + T])."""
  rng = np.random.default_rng(0)
  pt = rng.integers(1, 256, (B, P_LEN)).astype(np.int32)
  pm = np.arange(P_LEN)[None, :] >= rng.integers(0, 5, (B, 1))
  members = rng.integers(1, 256, (B, M, T)).astype(np.int32)
  mm = np.arange(T)[None, None, :] < rng.integers(1, T + 1, (B, M, 1))
  dpo_batch = dict(prompt_tokens=pt, prompt_mask=pm, members=members,
                   member_mask=mm, chosen=np.zeros((B, 1), np.int32),
                   rejected=np.ones((B, 1), np.int32),
                   pair_mask=np.ones((B, 1), bool))
  rows = np.concatenate([pt, members[:, 0]], axis=1)
  mask = np.concatenate([pm, mm[:, 0]], axis=1)
  loss_mask = np.concatenate([np.zeros_like(pm), mm[:, 0]], axis=1)
  return dpo_batch, dict(tokens=rows, mask=mask, loss_mask=loss_mask)


def _steps(schedule):
  dpo_step = functools.partial(
      dpo.train_step, beta=0.5, loss_type="sigmoid", label_smoothing=0.0,
      reduce="pairs", schedule=schedule)
  sft_step = functools.partial(sft.train_step, schedule=schedule)
  return dpo_step, sft_step


def _sampling_params():
  return dict(greedy=sampling.SamplingParams(temperature=0.0,
                                             max_new_tokens=T),
              sampled=sampling.SamplingParams(temperature=1.0, top_p=0.9,
                                              max_new_tokens=T))


def _scorers(graphdef):
  def response(params, pt, pm, members, mm):
    return scoring.response_logps(nnx.merge(graphdef, params), pt, pm,
                                  members, mm)

  def token(params, tokens, mask):
    return scoring.token_logps(nnx.merge(graphdef, params), tokens, mask)
  return response, token


@functools.lru_cache(maxsize=None)
def _setup():
  graphdef, params = _params(0)
  _, ref_params = _params(1)
  # Adam's first update is lr * g / (|g| + eps): with a tiny eps it turns
  # f32 reduction-order noise of near-zero gradients into lr-sized changes;
  # eps 1e-4 bounds that to lr * noise / eps ~ 1e-8 (not a sharding error).
  tx, schedule = state_lib.make_optimizer(learning_rate=1e-3, warmup_steps=0,
                                          total_steps=10, weight_decay=0.1,
                                          eps=1e-4)
  state = state_lib.TrainState.create(graphdef, params, tx,
                                      rng=jax.random.PRNGKey(0))
  # Host copies: device_put onto a mesh may reuse a device-0 buffer as a
  # shard, and the sharded step donates (deletes) its input state.
  state = jax.tree.map(np.asarray, state)
  dpo_batch, sft_batch = _batches()
  resp_args = tuple(dpo_batch[k] for k in ("prompt_tokens", "prompt_mask",
                                           "members", "member_mask"))
  return dict(graphdef=graphdef, params=params, ref_params=ref_params,
              state=state, dpo_batch=dpo_batch, sft_batch=sft_batch,
              steps=_steps(schedule), index=np.arange(B, dtype=np.int32),
              key=jax.random.PRNGKey(7), resp_args=resp_args)


@functools.lru_cache(maxsize=None)
def _want(name):
  """The single-device result of `name` (plain jax.jit, no mesh)."""
  s = _setup()
  dpo_step, sft_step = s["steps"]
  nan = np.int32(-1)
  if name == "dpo":
    return jax.jit(dpo_step)(s["state"], s["ref_params"], s["dpo_batch"], nan)
  if name == "sft":
    return jax.jit(sft_step)(s["state"], s["sft_batch"], nan)
  if name in ("greedy", "sampled"):
    b = s["dpo_batch"]
    return sampling.sample(s["graphdef"], s["params"], b["prompt_tokens"],
                           b["prompt_mask"], s["key"],
                           prompt_index=s["index"], num_candidates=K,
                           sampling=_sampling_params()[name])
  response, token = _scorers(s["graphdef"])
  if name == "response":
    return jax.jit(response)(s["params"], *s["resp_args"])
  return jax.jit(token)(s["params"], s["sft_batch"]["tokens"],
                        s["sft_batch"]["mask"])


def _close(got, want):
  jax.tree.map(lambda g, w: assert_allclose(np.asarray(g), np.asarray(w),
                                            atol=ATOL, rtol=0), got, want)


def _expected_specs(shape):
  """Specs the default rules give on mesh `shape` (axes of size 1 drop)."""
  fsdp = "fsdp" if shape[1] > 1 else None
  tensor = "tensor" if shape[2] > 1 else None
  vocab = tuple(a for a in (fsdp, tensor) if a)  # vocab-parallel tables
  vocab = vocab[0] if len(vocab) == 1 else vocab or None
  return {("layers", 0, "attn", "q_proj"): P(fsdp, tensor, None),
          ("layers", 0, "attn", "k_proj"): P(fsdp, tensor, None),
          ("layers", 0, "attn", "o_proj"): P(tensor, None, fsdp),
          ("layers", 0, "mlp", "down_proj"): P(tensor, fsdp),
          ("embed",): P(vocab, None),
          ("lm_head",): P(None, vocab),
          ("final_norm", "scale"): P(fsdp)}


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _assert_state_shardings(new, shape):
  for path, spec in _expected_specs(shape).items():
    assert _get(new.params, path).sharding.spec == spec, path
    mu = new.opt_state[1][0].mu  # chain(clip, adamw) -> adam's state
    assert _get(mu, path).sharding.spec == spec, path
  assert new.step.sharding.spec == P()
  assert new.opt_state[1][0].count.sharding.spec == P()


# (2, 2, 2) uses every mesh axis: it runs in the fast suite for the SFT step,
# the greedy sampler and the response scorer; the rest is marked slow (each
# case compiles its function on 8 devices).
FAST = {((2, 2, 2), "sft"), ((2, 2, 2), "greedy"), ((2, 2, 2), "response")}


def _cases(names):
  return [pytest.param(shape, name, marks=() if (shape, name) in FAST
                       else pytest.mark.slow)
          for shape in MESHES for name in names]


def _mesh(shape):
  mesh = sharding.make_mesh(shape)
  return mesh, sharding.param_shardings(_cfg(), mesh)


def _rows(shape):
  """The batch axis's spec entry on `shape` (size-1 axes drop)."""
  axes = tuple(a for a, n in zip(("data", "fsdp"), shape[:2]) if n > 1)
  return axes[0] if len(axes) == 1 else axes


@pytest.mark.parametrize("shape,name", _cases(("dpo", "sft")))
def test_train_step_equals_single_device(shape, name):
  s = _setup()
  mesh, p_sh = _mesh(shape)
  state_sh = sharded.state_shardings(s["state"], p_sh)
  dpo_step, sft_step = s["steps"]
  state = jax.device_put(s["state"], state_sh)
  nan = np.int32(-1)
  if name == "dpo":
    step = sharded.jit_train_step(dpo_step, state_sh,
                                  ("params", "batch", "replicated"),
                                  mesh=mesh)
    new, metrics = step(state, jax.device_put(s["ref_params"], p_sh),
                        s["dpo_batch"], nan)
  else:
    step = sharded.jit_train_step(sft_step, state_sh,
                                  ("batch", "replicated"), mesh=mesh)
    new, metrics = step(state, s["sft_batch"], nan)
  want_state, want_metrics = _want(name)
  _close(new.arrays(), want_state.arrays())
  _close(metrics, want_metrics)
  _assert_state_shardings(new, shape)
  assert state.step.is_deleted()  # the state was donated


@pytest.mark.parametrize("shape,name", _cases(("greedy", "sampled")))
def test_sampler_equals_single_device(shape, name):
  s = _setup()
  mesh, p_sh = _mesh(shape)
  b = s["dpo_batch"]
  sample = sharded.jit_sampler(s["graphdef"], p_sh, mesh=mesh,
                               num_candidates=K,
                               sampling=_sampling_params()[name])
  got = sample(jax.device_put(s["params"], p_sh), b["prompt_tokens"],
               b["prompt_mask"], s["key"], s["index"])
  want = _want(name)
  assert_array_equal(got.tokens, want.tokens)
  assert_array_equal(got.mask, want.mask)
  _close((got.logps, got.sample_logps), (want.logps, want.sample_logps))
  assert got.tokens.sharding.spec == P(_rows(shape), None, None)


@pytest.mark.parametrize("shape,name", _cases(("response", "token")))
def test_scorer_equals_single_device(shape, name):
  s = _setup()
  mesh, p_sh = _mesh(shape)
  params = jax.device_put(s["params"], p_sh)
  response, token = _scorers(s["graphdef"])
  if name == "response":
    f = sharded.jit_fn(response, p_sh, ("batch",) * 4, mesh=mesh)
    got = f(params, *s["resp_args"])
  else:
    f = sharded.jit_fn(token, p_sh, ("batch", "batch"), mesh=mesh)
    got = f(params, s["sft_batch"]["tokens"], s["sft_batch"]["mask"])
  _close(got, _want(name))
  assert got.sharding.spec == P(*((_rows(shape),) + (None,) * (got.ndim - 1)))


def test_batch_shardings_by_hand():
  mesh = sharding.make_mesh((2, 2, 2))
  sh = sharded.batch_shardings(
      dict(a=jnp.zeros((8, 3, 5)), b=jnp.zeros((6,)), c=jnp.zeros(())), mesh)
  assert sh["a"].spec == P(("data", "fsdp"), None, None)  # 8 % 4 == 0
  assert sh["b"].spec == P(None)  # 6 rows do not split over 4 devices
  assert sh["c"].spec == P()


def test_scanned_layers_under_a_mesh_equal_the_unrolled_single_device():
  """`scan_layers` (2 layers stacked per call) on mesh (2, 2, 2): the DPO
  step's state and metrics and the greedy sampler's tokens equal the
  unrolled model's on one device, and the params keep the rules' specs."""
  cfg = _cfg().replace(num_layers=2)
  graphdef, shapes = llama.abstract_model(cfg)
  scan_def, _ = llama.abstract_model(cfg.replace(scan_layers=True))
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda x: (0.02 * rng.standard_normal(x.shape) if
                                   len(x.shape) > 1 else np.ones(x.shape)
                                   ).astype(np.float32), shapes)
  s = _setup()
  dpo_step, _ = s["steps"]
  tx = s["state"].tx
  make = lambda g: jax.tree.map(np.asarray, state_lib.TrainState.create(
      g, params, tx, rng=jax.random.PRNGKey(0)))
  nan = np.int32(-1)
  want_state, want_metrics = jax.jit(dpo_step)(make(graphdef), params,
                                               s["dpo_batch"], nan)
  b = s["dpo_batch"]
  sp = _sampling_params()["greedy"]
  want_tokens = sampling.sample(graphdef, params, b["prompt_tokens"],
                                b["prompt_mask"], s["key"],
                                prompt_index=s["index"], num_candidates=K,
                                sampling=sp).tokens

  mesh = sharding.make_mesh((2, 2, 2))
  p_sh = sharding.param_shardings(cfg, mesh)
  state = make(scan_def)
  state_sh = sharded.state_shardings(state, p_sh)
  step = sharded.jit_train_step(dpo_step, state_sh,
                                ("params", "batch", "replicated"), mesh=mesh)
  new, metrics = step(jax.device_put(state, state_sh),
                      jax.device_put(params, p_sh), b, nan)
  _close(new.arrays(), want_state.arrays())
  _close(metrics, want_metrics)
  _assert_state_shardings(new, (2, 2, 2))
  sample = sharded.jit_sampler(scan_def, p_sh, mesh=mesh, num_candidates=K,
                               sampling=sp)
  got = sample(jax.device_put(params, p_sh), b["prompt_tokens"],
               b["prompt_mask"], s["key"], s["index"])
  assert_array_equal(got.tokens, want_tokens)


def test_memory_report_prints_each_program_once(monkeypatch, capsys):
  """PURLD_MEMORY_REPORT=1: one line per compiled shape with XLA's sizes;
  an f32[8, 1024] argument is 32 KiB = 0.00003 GiB, so check the name."""
  monkeypatch.setenv("PURLD_MEMORY_REPORT", "1")
  mesh = sharding.make_mesh((8, 1, 1))

  def double_rows(params, x):
    return x * params["w"]
  f = sharded.jit_fn(double_rows, dict(w=sharded.replicated(mesh)),
                     ("batch",), mesh=mesh)
  w = dict(w=jnp.float32(2.0))
  for _ in range(2):
    out = f(w, np.ones((8, 1024), np.float32))
  f(w, np.ones((4, 1024), np.float32))
  np.testing.assert_array_equal(np.asarray(out), 2.0)
  lines = [l for l in capsys.readouterr().err.splitlines()
           if l.startswith("[memory] ")]
  assert len(lines) == 2, lines  # shapes (8, 1024) and (4, 1024)
  assert all("double_rows args" in l and "temp" in l for l in lines)
