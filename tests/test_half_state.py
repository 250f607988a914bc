"""Half-precision state (issue 32, item 2): bf16 Adam first moments
(`opt.mu_dtype`) and a bf16 reference copy (`rl.reference_dtype`), f32
master weights kept; expectations by hand."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx
from numpy.testing import assert_allclose, assert_array_equal

from purld_jax.train import dpo
from purld_jax.train import grpo
from purld_jax.train import pu_rl
from purld_jax.train import state as state_lib
from tests import core_fixtures
from tests import train_fixtures
from tests.train_fixtures import jit_cache  # noqa: F401  (fixture)

BF16 = ml_dtypes.bfloat16
LR, B1, B2, EPS = 0.1, 0.9, 0.95, 1e-8


def _state(params, mu_dtype):
  tx, _ = state_lib.make_optimizer(
      learning_rate=LR, warmup_steps=0, total_steps=10, end_lr_ratio=1.0,
      b1=B1, b2=B2, eps=EPS, clip_norm=0.0, mu_dtype=mu_dtype)
  return state_lib.TrainState.create(None, params, tx,
                                     rng=jax.random.PRNGKey(0))


def _adam(opt_state) -> optax.ScaleByAdamState:
  (adam,) = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
  return adam


# 0.3, -0.7, 1.3: 0.1 g is not a bf16 number (bf16(0.03) = 0.030029296875).
G1 = {"w": jnp.array([[0.3, -0.7]]), "b": jnp.array([1.3])}
G2 = {"w": jnp.array([[-0.2, 0.5]]), "b": jnp.array([0.9])}
P0 = {"w": jnp.array([[1.0, -2.0]]), "b": jnp.array([3.0])}


@pytest.mark.parametrize("mu_dtype", ["float32", "bfloat16"])
def test_mu_is_stored_in_its_dtype_params_and_nu_stay_f32(mu_dtype):
  state = _state(P0, mu_dtype)
  new, _ = state.apply_grads(G1)
  for s in (state, new):
    adam = _adam(s.opt_state)
    want = jnp.bfloat16 if mu_dtype == "bfloat16" else jnp.float32
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(want)}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {
        jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(s.params)} == {
        jnp.dtype(jnp.float32)}
  # mu_1 = (1 - b1) g, rounded to bf16 when stored in bf16.
  mu1 = _adam(new.opt_state).mu["w"]
  want = np.float32(1 - B1) * np.asarray(G1["w"])
  if mu_dtype == "bfloat16":
    want = want.astype(BF16)
  assert_array_equal(np.asarray(mu1), want)


def test_first_step_by_hand_is_minus_lr_sign_g_in_both():
  """With bias correction the first update is -lr m1 / (sqrt(v1) + eps),
  m1 = g, v1 = g^2: -lr sign(g) (g / (|g| + eps)) for f32 and bf16 mu alike
  (the update uses the f32 moment before it is stored)."""
  want = jax.tree.map(
      lambda p, g: np.asarray(p) - LR * np.asarray(g) / (np.abs(g) + EPS),
      P0, G1)
  for mu_dtype in ("float32", "bfloat16"):
    new, _ = _state(P0, mu_dtype).apply_grads(G1)
    jax.tree.map(lambda a, b: assert_allclose(a, b, rtol=1e-6), new.params,
                 want)
    # about -lr sign(g): every weight moved by lr against its gradient.
    jax.tree.map(lambda a, p, g: assert_allclose(
        np.asarray(a) - p, -LR * np.sign(g), rtol=1e-6), new.params, P0, G1)


def test_second_step_reads_the_rounded_mu():
  """Step 2 by hand: m2 = b1 m1 + (1 - b1) g2, v2 = b2 v1 + (1 - b2) g2^2,
  update -lr (m2 / (1 - b1^2)) / (sqrt(v2 / (1 - b2^2)) + eps). With bf16
  mu, m1 is stored rounded and optax's b1 m1 (a Python float times a bf16
  array) is rounded to bf16 again before the f32 (1 - b1) g2 is added: two
  roundings, each <= 2^-8 relative. Both move every weight the same way."""
  outs = {}
  for mu_dtype in ("float32", "bfloat16"):
    s, _ = _state(P0, mu_dtype).apply_grads(G1)
    s, _ = s.apply_grads(G2)
    outs[mu_dtype] = s.params
    g1, g2 = np.asarray(G1["w"], np.float32), np.asarray(G2["w"], np.float32)
    p1 = np.asarray(P0["w"]) - LR * g1 / (np.abs(g1) + EPS)
    m1 = np.float32(1 - B1) * g1
    v2 = (np.float32(B2) * np.float32(1 - B2) * g1 ** 2
          + np.float32(1 - B2) * g2 ** 2)
    step2 = lambda m2: p1 - LR * (m2 / (1 - B1 ** 2)) / (
        np.sqrt(v2 / (1 - B2 ** 2)) + EPS)
    if mu_dtype == "float32":
      m2 = np.float32(B1) * m1 + np.float32(1 - B1) * g2
      assert_allclose(np.asarray(s.params["w"]), step2(m2), rtol=1e-6)
      continue
    # Op by op the product b1 m1 is rounded to bf16 again; compiled (the
    # update runs under lax.cond) XLA:CPU may keep it in f32. Either way
    # the result lies between the two hand computations.
    m1r = m1.astype(BF16)
    once = np.float32(BF16(B1)) * m1r.astype(np.float32)
    twice = once.astype(BF16).astype(np.float32)
    got = np.asarray(s.params["w"])
    ends = [step2(d + np.float32(1 - B1) * g2) for d in (once, twice)]
    lo, hi = np.minimum(*ends), np.maximum(*ends)
    tol = 1e-6 * np.abs(got)
    assert np.all((got >= lo - tol) & (got <= hi + tol)), (got, ends)
  d32 = np.asarray(outs["float32"]["w"]) - np.asarray(P0["w"])
  d16 = np.asarray(outs["bfloat16"]["w"]) - np.asarray(P0["w"])
  assert not np.array_equal(d32, d16)  # the rounding is seen ...
  assert_array_equal(np.sign(d32), np.sign(d16))  # ... same direction
  assert_allclose(d16, d32, rtol=2 ** -8)


def test_bf16_mu_settles_at_its_gain_for_a_steady_gradient():
  """g = 1 every step: the f32 mu -> 1; the bf16 mu -> (1 - b1) / (1 -
  bf16(b1)) = 0.1 / 0.1015625 = 0.9846 (optax computes b1 mu in bf16, b1
  rounded to 0.8984375), up to the bf16 rounding of mu itself."""
  assert state_lib.mu_bf16_gain(0.9) == pytest.approx(0.1 / 0.1015625)
  assert state_lib.mu_bf16_gain(0.999) == 0.0  # bf16(0.999) = 1
  ones = {"w": jnp.ones(4)}
  mus = {}
  for mu_dtype in ("float32", "bfloat16"):
    s = _state({"w": jnp.zeros(4)}, mu_dtype)
    for _ in range(200):
      s, _ = s.apply_grads(ones)
    mus[mu_dtype] = float(_adam(s.opt_state).mu["w"][0])
  assert mus["float32"] == pytest.approx(1.0, abs=1e-6)
  # The update is compiled (lax.cond): b1 mu + (1 - b1) g in f32 with b1
  # rounded to bf16, one rounding when mu is stored. By hand: it stalls once
  # an increment is under half a bf16 step, below the bias-only gain.
  m = np.float32(0)
  for _ in range(200):
    m = np.float32(BF16(np.float32(BF16(B1)) * m + np.float32(1 - B1)))
  assert mus["bfloat16"] == m
  assert m < state_lib.mu_bf16_gain(B1) and m == pytest.approx(1, abs=0.035)


def test_bf16_mu_halves_the_mu_bytes():
  # 1,000 x 1,000 + 1,000 f32 params: mu 4,004,000 bytes in f32, 2,002,000
  # in bf16; nu 4,004,000 both; the step counter 4 bytes.
  params = {"w": jnp.zeros((1000, 1000)), "b": jnp.zeros(1000)}
  nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))
  f32, bf16 = (_adam(_state(params, d).opt_state)
               for d in ("float32", "bfloat16"))
  assert (nbytes(f32.mu), nbytes(bf16.mu)) == (4_004_000, 2_002_000)
  assert nbytes(f32.nu) == nbytes(bf16.nu) == 4_004_000
  assert nbytes(_state(params, "float32").opt_state) - nbytes(
      _state(params, "bfloat16").opt_state) == 2_002_000


def test_optimizer_from_config_reads_mu_dtype_and_stays_cached():
  c = train_fixtures.tiny_config(**{"opt.mu_dtype": "bfloat16"})
  kw = dict(learning_rate=1e-3, warmup_frac=0.25, total_steps=4)
  tx, _ = state_lib.optimizer_from_config(c.opt, **kw)
  assert tx is state_lib.optimizer_from_config(c.opt, **kw)[0]  # lru_cache
  mu = _adam(tx.init({"w": jnp.zeros((2, 2))})).mu
  assert mu["w"].dtype == jnp.bfloat16
  c.opt.mu_dtype = "float32"
  assert state_lib.optimizer_from_config(c.opt, **kw)[0] is not tx
  with pytest.raises(ValueError, match="mu_dtype 'float16'"):
    state_lib.make_optimizer(learning_rate=1.0, warmup_steps=0,
                             total_steps=1, mu_dtype="float16")


# ----------------------------------------------------------------------------
# The bf16 reference


def test_bf16_reference_scores_as_its_rounded_f32_copy():
  """The model casts every weight to its compute dtype (f32 here) where it
  is used, so a bf16 param tree gives exactly the DPO (and GRPO) reference
  log-probs of the f32 tree holding the same (rounded) values, and the DPO
  step on it is the same; the f32 reference differs (by the rounding)."""
  policy = core_fixtures.random_tiny_model(seed=7)
  graphdef, params = nnx.split(policy)
  ref32 = nnx.split(core_fixtures.random_tiny_model(seed=8))[1]
  ref16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), ref32)
  rounded = jax.tree.map(lambda x: x.astype(jnp.float32), ref16)
  from tests.test_train_steps import _batch  # pylint: disable=g-import-not-at-top
  step = jax.jit(functools.partial(
      dpo.train_step, beta=0.5, loss_type="sigmoid", label_smoothing=0.0,
      reduce="pairs", schedule=lambda c: 1.0))
  out = {}
  for name, ref in (("bf16", ref16), ("rounded", rounded), ("f32", ref32)):
    state = state_lib.TrainState.create(graphdef, params, optax.sgd(1.0),
                                        rng=jax.random.PRNGKey(0))
    new, m = step(state, ref, _batch())
    out[name] = (float(m["loss"]), new.params)
    assert {x.dtype for x in jax.tree.leaves(new.params)} == {
        jnp.dtype(jnp.float32)}
  assert out["bf16"][0] == out["rounded"][0]
  jax.tree.map(assert_array_equal, out["bf16"][1], out["rounded"][1])
  assert out["bf16"][0] != out["f32"][0]
  assert_allclose(out["bf16"][0], out["f32"][0], rtol=1e-2)
  # GRPO's KL reference log-probs f32[B, K, T], likewise.
  from tests.test_train_steps import _grpo_batch  # pylint: disable=g-import-not-at-top
  lps = {name: np.asarray(jax.jit(lambda p: grpo.reference_logps(
      nnx.merge(graphdef, p), _grpo_batch(), vocab_chunk=8))(ref))
         for name, ref in (("bf16", ref16), ("rounded", rounded))}
  assert lps["bf16"].dtype == np.float32
  assert_array_equal(lps["bf16"], lps["rounded"])


def test_cast_reference_and_lora_views():
  host = {"w": np.array([[0.1, 1 / 3]], np.float32), "n": np.ones(2, np.float32)}
  assert pu_rl.cast_reference(host, "float32") is host
  cast = pu_rl.cast_reference(host, "bfloat16")
  assert cast["w"].dtype == BF16 and cast["n"].dtype == BF16
  assert_array_equal(cast["w"], host["w"].astype(BF16))
  assert host["w"].dtype == np.float32  # the policy's init is not touched
  with pytest.raises(ValueError, match="reference_dtype 'float16'"):
    pu_rl.cast_reference(host, "float16")

  class Lora:  # lora_views reads only `frozen` before it refuses
    frozen = {"embed": np.zeros(2)}
  with pytest.raises(ValueError, match="does not apply with LoRA"):
    pu_rl.lora_views(Lora(), host, None, "bfloat16")


# ----------------------------------------------------------------------------
# Stage 2 on the tiny config: bf16 reference and bf16 mu, checkpoint, resume


def test_stage2_bf16_reference_and_mu_end_to_end_and_resume(
    tmp_path, monkeypatch, jit_cache):  # noqa: F811
  """DPO stage 2 on the tiny config with both options: the reference the
  step reads is bf16 on the devices, the trained params and nu f32, mu bf16
  in the checkpoint (its abstract target says bf16 too); a resume from
  step 1 reloads the bf16 reference and ends bit-identical."""
  seen = []
  real = pu_rl.lora_views

  def spy(*args):
    out = real(*args)
    seen.append(out[0])
    return out
  monkeypatch.setattr(pu_rl, "lora_views", spy)
  c = train_fixtures.tiny_config(**{
      "recipe": "dpo", "rl.steps": 2, "sft.steps": 1,
      "rl.reference_dtype": "bfloat16", "opt.mu_dtype": "bfloat16",
      "log.tensorboard": False, "ckpt.async_save": False,
      "ckpt.every_steps": 1, "ckpt.keep": 3, "ckpt.keep_finished": "all"})
  out = pu_rl.run(c, str(tmp_path))
  assert len(seen) == 1
  assert {x.dtype for x in jax.tree.leaves(seen[0])} == {
      jnp.dtype(jnp.bfloat16)}
  full = train_fixtures.restore_rl_arrays(c, tmp_path, 2)
  adam = _adam(full["opt_state"])
  assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {
      jnp.dtype(jnp.bfloat16)}
  for tree in (adam.nu, full["params"]):
    assert {x.dtype for x in jax.tree.leaves(tree)} == {
        jnp.dtype(jnp.float32)}
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    rl = [r for r in map(json.loads, f) if r["stage"] == "dpo"]
  assert [r["step"] for r in rl] == [1, 2]
  assert all(np.isfinite(r["loss"]) for r in rl)
  # Resume from step 1: drop the final model and step 2, run again.
  shutil.rmtree(out)
  shutil.rmtree(tmp_path / "ckpt" / "dpo" / "2")
  pu_rl.run(c, str(tmp_path))
  assert len(seen) == 2 and jax.tree.leaves(seen[1])[0].dtype == jnp.bfloat16
  again = train_fixtures.restore_rl_arrays(c, tmp_path, 2)
  jax.tree.map(lambda a, b: assert_array_equal(np.asarray(a), np.asarray(b)),
               again, full)
  assert os.path.isfile(os.path.join(out, "model.safetensors"))
