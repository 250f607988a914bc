"""LoRA students (purld_jax/models/lora.py): frozen-base training steps,
merged and PEFT exports (peft itself is the oracle), config checks, and
checkpoints that hold the adapters alone.

  .venv/bin/python -m pytest -q tests/test_lora.py
"""

import functools
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from numpy import testing as npt
from safetensors import numpy as st_numpy

from purld_jax import config_check
from purld_jax import export
from purld_jax import losses
from purld_jax import models
from purld_jax import scoring
from purld_jax import sharded
from purld_jax import sharding
from purld_jax.models import hf
from purld_jax.models import llama
from purld_jax.models import lora
from purld_jax.train import dpo
from purld_jax.train import pu_rl
from purld_jax.train import sft
from purld_jax.train import state as state_lib
from purld_jax.train import student as student_lib
from tests import train_fixtures
from tests.train_fixtures import char_tok  # noqa: F401  (fixture)
from tests.train_fixtures import jit_cache  # noqa: F401  (fixture)

SPEC = lora.LoraSpec(rank=4, alpha=8.0)  # scale 2


def _model_parts(scan=False, spec=SPEC, seed=0):
  """(cfg, graphdef, adapters, base) of a random tiny LoRA model; B = 0."""
  cfg = llama.tiny_config(scan_layers=scan, lora=spec)
  graphdef, _ = llama.abstract_model(cfg)
  base = student_lib._random_params(lora.base_config(cfg), seed)  # pylint: disable=protected-access
  return cfg, graphdef, lora.init_adapters(cfg, seed + 1), base


def _nonzero_b(adapters, seed=3, scale=0.05):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x if p[-1].key == "lora_a" else jnp.asarray(
          scale * rng.standard_normal(x.shape), x.dtype), adapters)


def _tokens(seed=0, b=2, t=9, vocab=96):
  return np.random.default_rng(seed).integers(0, vocab, (b, t), np.int32)


# ----------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("scan", [False, True])
def test_zero_b_is_the_base_and_fold_by_hand(scan):
  cfg, graphdef, adapters, base = _model_parts(scan)
  tokens = jnp.asarray(_tokens())
  base_model = nnx.merge(llama.abstract_model(lora.base_config(cfg))[0], base)
  want = np.asarray(base_model(tokens))
  npt.assert_array_equal(np.asarray(
      nnx.merge(graphdef, lora.join(adapters, base))(tokens)), want)
  adapters = _nonzero_b(adapters)
  full = lora.join(adapters, base)
  got = np.asarray(nnx.merge(graphdef, full)(tokens))
  assert np.abs(got - want).max() > 1e-3  # the adapters do something
  # fold: W + (alpha / r) A B reshaped, in numpy.
  folded = lora.fold(full, cfg)
  for block, name in (("attn", "q_proj"), ("attn", "o_proj"),
                      ("mlp", "down_proj")):
    ad = adapters["layers"][1][block][name + lora.SUFFIX]
    w = np.asarray(base["layers"][1][block][name])
    delta = 2.0 * np.asarray(ad["lora_a"]) @ np.asarray(ad["lora_b"])
    npt.assert_allclose(folded["layers"][1][block][name],
                        w + delta.reshape(w.shape), rtol=1e-6, atol=1e-7)
  merged = nnx.merge(llama.abstract_model(lora.base_config(cfg))[0], folded)
  npt.assert_allclose(np.asarray(merged(tokens)), got, atol=2e-5, rtol=0)


def test_adapters_shard_like_their_weights():
  cfg = llama.tiny_config(lora=SPEC)
  names = sharding.logical_axes(nnx.eval_shape(
      lambda: llama.Llama(cfg, rngs=nnx.Rngs(0))))["layers"][0]
  assert names["attn"]["q_proj_lora"] == {"lora_a": ("embed", None),
                                          "lora_b": (None, "q_heads")}
  assert names["attn"]["k_proj_lora"]["lora_b"] == (None, "kv_heads")
  assert names["attn"]["o_proj_lora"]["lora_a"] == ("q_heads", None)
  assert names["mlp"]["down_proj_lora"] == {"lora_a": ("mlp", None),
                                            "lora_b": (None, "embed")}
  adapters, base = lora.split(llama.abstract_model(cfg)[1])
  assert "q_proj_lora" not in base["layers"][0]["attn"]
  assert set(adapters["layers"][0]["mlp"]) == {
      "gate_proj_lora", "up_proj_lora", "down_proj_lora"}
  only_q = llama.tiny_config(lora=lora.LoraSpec(2, 4.0, ("q_proj",)))
  ad, _ = lora.split(llama.abstract_model(only_q)[1])
  assert ad["layers"][0] == {"attn": {"q_proj_lora": {
      "lora_a": jax.ShapeDtypeStruct((32, 2), jnp.float32),
      "lora_b": jax.ShapeDtypeStruct((2, 32), jnp.float32)}}}


# ----------------------------------------------------------------------------
# (a) A train step changes only the adapters, and the loss goes down


def _sft_batch(seed=0, b=4, t=12):
  tokens = _tokens(seed, b, t, 128)
  mask = np.ones((b, t), bool)
  loss_mask = np.zeros((b, t), bool)
  loss_mask[:, 6:] = True
  return dict(tokens=tokens, mask=mask, loss_mask=loss_mask)


def _nll(state, batch):
  logps = scoring.token_logps(state.model(), batch["tokens"], batch["mask"])
  return float(losses.sft_nll(logps, batch["loss_mask"])[0])


def _sft_steps(scan, shape, n=5):
  """n jitted SFT steps (Adam, lr 1e-2) of a tiny LoRA model on a mesh of
  `shape`: (state, the frozen tree passed in, its values before, the
  adapters before, the batch)."""
  cfg, graphdef, adapters, base = _model_parts(scan)
  devices = jax.devices()[:int(np.prod(shape))]
  mesh = sharding.make_mesh(shape, devices)
  ad_sh, base_sh = lora.split(sharding.param_shardings(cfg, mesh))
  frozen = sharded.put(base, base_sh)
  before = jax.tree.map(np.array, frozen)
  tx = optax.adam(1e-2)
  state = state_lib.TrainState.create(
      graphdef, sharded.put(adapters, ad_sh), tx, rng=jax.random.PRNGKey(0),
      frozen=frozen)
  # Only the adapters are trained: the optimizer state mirrors them alone.
  n_ad = sum(x.size for x in jax.tree.leaves(adapters))
  assert sum(x.size for x in jax.tree.leaves(state.opt_state)
             if x.ndim) == 2 * n_ad
  state_sh = sharded.state_shardings(jax.eval_shape(lambda s: s, state),
                                     ad_sh, base_sh)
  step = sharded.jit_train_step(
      functools.partial(sft.train_step, schedule=lambda c: 1e-2), state_sh,
      ("batch", "replicated"), mesh=mesh)
  assert isinstance(step, sharded.FrozenStep)
  batch = _sft_batch()
  start = jax.tree.map(np.array, state.params)
  for _ in range(n):
    state, metrics = step(state, batch, np.int32(-1))
    assert float(metrics["grad_norm"]) > 0
  return state, frozen, before, start, batch


@pytest.mark.parametrize("scan", [False, True])
def test_sft_steps_train_only_the_adapters(scan):
  state0 = _sft_steps(scan, (1, 1, 1), n=0)[0]
  state, frozen, before, start, batch = _sft_steps(scan, (1, 1, 1))
  # The frozen base: the same arrays, never donated, bit-identical.
  assert state.frozen is frozen
  assert not any(x.is_deleted() for x in jax.tree.leaves(frozen))
  jax.tree.map(npt.assert_array_equal, jax.tree.map(np.asarray, frozen),
               before)
  # The adapters moved (B from 0, then A) and the trained batch's NLL fell.
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                         state.params, start)
  assert all(jax.tree.leaves(changed))
  assert set(state.arrays()) == {"params", "opt_state", "step", "rng"}
  nll0, nll5 = _nll(state0, batch), _nll(state, batch)
  assert nll5 < nll0 - 0.05, (nll0, nll5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_sft_steps_on_a_2x2x2_mesh_equal_one_device():
  """Adapters shard like their weights (A on fsdp by embed, B on tensor by
  heads / mlp) and the steps give one device's adapters."""
  one = _sft_steps(False, (1, 1, 1))[0]
  state, frozen, before, _, _ = _sft_steps(False, (2, 2, 2))
  q = state.params["layers"][0]["attn"]["q_proj_lora"]
  assert q["lora_a"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert q["lora_b"].sharding.spec == jax.sharding.PartitionSpec(None,
                                                                 "tensor")
  down = state.params["layers"][1]["mlp"]["down_proj_lora"]
  assert down["lora_a"].sharding.spec == jax.sharding.PartitionSpec(
      "tensor", None)
  jax.tree.map(npt.assert_array_equal, jax.tree.map(np.asarray, frozen),
               before)
  jax.tree.map(lambda a, b: npt.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5),
               state.params, one.params)


def test_dpo_reference_is_the_frozen_base_with_zero_adapters():
  """Stage 2's LoRA reference (`pu_rl.lora_views`): zero adapters over the
  policy's own frozen arrays; at B = 0 policy == reference, so the DPO
  margin is 0 and the sigmoid loss log 2; the step moves B only."""
  cfg, graphdef, adapters, base = _model_parts()
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  param_sh = sharding.param_shardings(cfg, mesh)
  s = student_lib.Student(cfg=cfg, hf_dir=None, init_seed=0, tokenizer=None)
  train = student_lib.trainable(s, param_sh, lambda: base, seed=1)
  ref, ref_full, full = pu_rl.lora_views(train, base, param_sh)
  # No second copy of the base: the reference holds the frozen arrays.
  for a, b in zip(jax.tree.leaves(lora.split(ref_full)[1]),
                  jax.tree.leaves(train.frozen)):
    assert a is b
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(ref))
  assert all(k.endswith(lora.SUFFIX) for k in ref["layers"][0]["attn"])
  assert lora.split(full(ref))[1]["embed"] is train.frozen["embed"]
  state = state_lib.TrainState.create(
      graphdef, sharded.put(train.init(), train.shardings),
      optax.sgd(1.0), rng=jax.random.PRNGKey(0), frozen=train.frozen)
  from tests.test_train_steps import _batch  # pylint: disable=g-import-not-at-top
  new, m = jax.jit(functools.partial(
      dpo.train_step, beta=0.5, loss_type="sigmoid", label_smoothing=0.0,
      reduce="pairs", schedule=lambda c: 1.0))(state, ref, _batch())
  npt.assert_allclose(float(m["loss"]), np.log(2.0), rtol=1e-6)
  assert float(m["margin"]) == 0.0
  moved = jax.tree_util.tree_map_with_path(
      lambda p, a, b: (p[-1].key, bool(np.any(np.asarray(a) != b))),
      new.params, state.params)
  assert {k for k, c in jax.tree.leaves(moved, is_leaf=lambda x:
                                        isinstance(x, tuple)) if c} == {
                                            "lora_b"}  # dL/dA = 0 at B = 0


# ----------------------------------------------------------------------------
# (b) The merged export, (c) the PEFT directory loaded by peft


def test_merged_export_has_the_adapted_logits(tmp_path, char_tok):  # noqa: F811
  cfg, graphdef, adapters, base = _model_parts()
  model = nnx.merge(graphdef, lora.join(_nonzero_b(adapters), base))
  models.save_pretrained(model, char_tok, tmp_path / "merged")
  loaded = models.load_model(tmp_path / "merged")
  assert loaded.cfg.lora is None
  tokens = jnp.asarray(_tokens(1))
  npt.assert_allclose(np.asarray(loaded(tokens)), np.asarray(model(tokens)),
                      atol=2e-5, rtol=0)
  # The file holds W + 2 A B for every adapted weight (HF layout [out, in]).
  got = hf.load_params(tmp_path / "merged", cfg)
  ad = _nonzero_b(adapters)["layers"][0]["attn"]["k_proj_lora"]
  w = np.asarray(base["layers"][0]["attn"]["k_proj"])
  want = w + (2.0 * np.asarray(ad["lora_a"]) @ np.asarray(ad["lora_b"])
              ).reshape(w.shape)
  npt.assert_allclose(got["layers"][0]["attn"]["k_proj"], want, rtol=1e-6,
                      atol=1e-7)


@pytest.mark.parametrize("variant", ["llama_untied", "qwen2"])
def test_peft_loads_the_adapter_with_our_logits(tmp_path, variant):
  from tests.models import torch_oracle  # pylint: disable=g-import-not-at-top
  peft = pytest.importorskip("peft")
  base_dir = tmp_path / "base"
  torch_model = torch_oracle.make_checkpoint(variant, base_dir)
  targets = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
  cfg = hf.read_config(base_dir).replace(
      lora=lora.LoraSpec(rank=3, alpha=6.0, targets=targets))
  adapters = _nonzero_b(lora.init_adapters(cfg, 0), scale=0.2)
  params = lora.join(adapters, hf.load_params(base_dir, cfg))
  model = nnx.merge(llama.abstract_model(cfg)[0], params)
  out = tmp_path / "adapter"
  lora.write_peft(adapters, cfg, out, base_model_name_or_path=str(base_dir))
  meta = json.loads((out / lora.PEFT_CONFIG).read_text())
  assert (meta["peft_type"], meta["r"], meta["lora_alpha"]) == ("LORA", 3, 6.0)
  assert meta["base_model_name_or_path"] == str(base_dir)
  tokens = _tokens(2)
  base_logits = torch_oracle.torch_logits(torch_model, tokens)
  peft_model = peft.PeftModel.from_pretrained(torch_model, str(out)).eval()
  want = torch_oracle.torch_logits(peft_model, tokens)
  assert np.abs(want - base_logits).max() > 1e-2  # peft applied them
  npt.assert_allclose(np.asarray(model(jnp.asarray(tokens))), want,
                      atol=1e-4, rtol=0)
  key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
  assert lora.peft_tensors(adapters, cfg)[key].shape == (3, 32)


# ----------------------------------------------------------------------------
# (d) Config errors


def test_bad_lora_fields_are_named():
  c = train_fixtures.tiny_config(**{
      "model.lora.rank": 4, "model.lora.alpha": 0.0, "model.lora.dropout": 0.1,
      "model.lora.targets": ("q_proj", "x_proj", "q_proj")})
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(c)
  text = str(e.value)
  assert "model.lora.alpha=0.0: must be > 0" in text
  assert "model.lora.dropout=0.1: must be 0" in text
  assert "model.lora.targets: ['x_proj'] not in" in text
  assert "a target named twice" in text
  c = train_fixtures.tiny_config(**{"model.lora.rank": -1})
  with pytest.raises(config_check.ConfigError, match=r"model.lora.rank=-1: "
                     r"must be an integer >= 0"):
    config_check.validate(c)
  c = train_fixtures.tiny_config(**{"model.lora.rank": 2,
                                    "model.lora.targets": ()})
  with pytest.raises(config_check.ConfigError, match="must be a non-empty"):
    config_check.validate(c)
  # rank 0 (the default) is off: the other fields are not read.
  config_check.validate(train_fixtures.tiny_config(**{
      "model.lora.dropout": 0.5}))
  assert lora.spec_from_config(train_fixtures.tiny_config().model.lora) is None


# ----------------------------------------------------------------------------
# (e) Checkpoints hold the adapters alone; a resume restores them


def _ckpt_param_paths(step_dir):
  meta = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "state"))
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  return {jax.tree_util.keystr(p) for p, _ in
          jax.tree_util.tree_flatten_with_path(tree["params"])[0]}


def test_sft_checkpoints_adapters_and_resumes(tmp_path, capsys,
                                              jit_cache):  # noqa: F811
  c = train_fixtures.tiny_config(**{
      "model.lora.rank": 4, "sft.steps": 4, "ckpt.every_steps": 2,
      "ckpt.keep_finished": "all", "ckpt.async_save": False,
      "log.tensorboard": False})
  work = tmp_path / "w"
  out = sft.run(c, str(work))
  paths = _ckpt_param_paths(work / "ckpt" / "sft" / "2")
  assert paths and all("_lora']['lora_" in p for p in paths), sorted(paths)
  assert not any("'embed'" in p or "['q_proj']" in p for p in paths)
  first = st_numpy.load_file(os.path.join(out, hf.SAFETENSORS))
  # The reference is the merge; adapter/ the PEFT directory on the base.
  meta = json.loads((work / "reference" / sft.ADAPTER / lora.PEFT_CONFIG
                     ).read_text())
  assert meta["base_model_name_or_path"] == "tiny" and meta["r"] == 4
  s = student_lib.from_config(c.model, str(work))
  base = s.init_params()
  assert not np.array_equal(first["model.layers.0.self_attn.q_proj.weight"],
                            np.asarray(base["layers"][0]["attn"]["q_proj"]
                                       ).reshape(32, -1).T)
  npt.assert_array_equal(first["model.embed_tokens.weight"], base["embed"])
  # Step 4 lost: the same run resumes at step 2 (adapters restored, the
  # base reloaded) and writes the same reference.
  shutil.rmtree(work / "ckpt" / "sft" / "4")
  shutil.rmtree(work / "reference")
  capsys.readouterr()
  sft.run(c, str(work))
  assert "[sft] resumed from step 2" in capsys.readouterr().err
  again = st_numpy.load_file(os.path.join(out, hf.SAFETENSORS))
  assert set(again) == set(first)
  for name, value in first.items():
    npt.assert_allclose(again[name], value, rtol=0, atol=1e-6, err_msg=name)
  # Export of the LoRA checkpoint: its adapters merged into the base (the
  # student's init for stage 1), and the adapters as OUT/adapter/.
  src, exported, _ = export.export(work, tmp_path / "out", source="latest")
  assert (src.stage, src.step) == ("sft", 4)
  got = st_numpy.load_file(os.path.join(exported, hf.SAFETENSORS))
  for name, value in first.items():
    npt.assert_allclose(got[name], value, rtol=0, atol=1e-6, err_msg=name)
  peft_dir = os.path.join(exported, export.ADAPTER)
  npt.assert_array_equal(
      st_numpy.load_file(os.path.join(peft_dir, lora.PEFT_WEIGHTS))[
          "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"],
      st_numpy.load_file(work / "reference" / sft.ADAPTER / lora.PEFT_WEIGHTS)[
          "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"])


def test_grpo_on_a_lora_student_end_to_end(tmp_path, jit_cache):  # noqa: F811
  """Stage 2 with LoRA: the first update's KL to the reference is 0 (the
  policy IS the frozen reference at B = 0), the checkpoint holds adapters,
  final/ is the merge over reference/ and final/adapter/ names it."""
  c = train_fixtures.tiny_config(**{
      "recipe": "grpo", "rl.steps": 2, "sft.steps": 1, "model.lora.rank": 4,
      "model.lora.targets": ("q_proj", "v_proj", "down_proj"),
      "log.tensorboard": False, "ranking.yes_word": "Y",
      "ranking.no_word": "N", "ckpt.async_save": False,
      "ckpt.every_steps": 1, "ckpt.keep_finished": "all"})
  out = pu_rl.run(c, str(tmp_path))
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if '"grpo"' in line]
  assert rows[0]["kl"] == 0.0 and rows[0]["grad_norm"] > 0
  paths = _ckpt_param_paths(tmp_path / "ckpt" / "grpo" / "2")
  assert {re.search(r"'(\w+_lora)'", p).group(1) for p in paths} == {
      "q_proj_lora", "v_proj_lora", "down_proj_lora"}
  meta = json.loads((tmp_path / "final" / sft.ADAPTER / lora.PEFT_CONFIG
                     ).read_text())
  assert meta["base_model_name_or_path"] == sft.reference_dir(str(tmp_path))
  assert meta["target_modules"] == ["down_proj", "q_proj", "v_proj"]
  ref = st_numpy.load_file(tmp_path / "reference" / hf.SAFETENSORS)
  final = st_numpy.load_file(os.path.join(out, hf.SAFETENSORS))
  changed = {n for n in ref if not np.array_equal(ref[n], final[n])}
  assert changed and all(n.split(".")[-2] in ("q_proj", "v_proj", "down_proj")
                         for n in changed), sorted(changed)
