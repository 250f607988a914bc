"""LoRA runs end to end (issue 32's gaps): exporting a LoRA HF directory
with --dtype keeps its adapter/; stage 2 DPO and LDL on a LoRA student;
an exact resume of a LoRA stage 2 after kill -9.

  .venv/bin/python -m pytest -q tests/test_lora_stages.py
  .venv/bin/python -m pytest -q -m slow tests/test_lora_stages.py
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numpy import testing as npt
from safetensors import numpy as st_numpy

from purld_jax import export
from purld_jax.models import hf
from purld_jax.models import llama
from purld_jax.models import lora
from purld_jax.train import sft
from purld_jax.train import student as student_lib
from tests.train_fixtures import char_tok  # noqa: F401  (fixture)
from tests.train_fixtures import jit_cache  # noqa: F401  (fixture)

# ----------------------------------------------------------------------------
# Export of a LoRA run's HF directory with --dtype


def _lora_final(workdir, tok, spec=lora.LoraSpec(rank=2, alpha=4.0)):
  """WORKDIR/final/ as a LoRA stage writes it (the merge and adapter/),
  adapters with B != 0; returns (cfg, adapters, base)."""
  cfg = llama.tiny_config(lora=spec)
  base = student_lib._random_params(lora.base_config(cfg), 0)  # pylint: disable=protected-access
  rng = np.random.default_rng(5)
  adapters = jax.tree.map(
      lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype),
      lora.init_adapters(cfg, 1))
  graphdef, _ = llama.abstract_model(cfg)
  sft.write_model_dir(graphdef, lora.join(adapters, base), tok,
                      os.path.join(workdir, "final"), "DONE", {"steps": 1},
                      adapter_base=os.path.join(workdir, "reference"))
  return cfg, adapters, base


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_export_of_a_lora_dir_with_dtype_writes_its_adapter(
    tmp_path, char_tok, dtype):  # noqa: F811
  work = tmp_path / "w"
  cfg, adapters, _ = _lora_final(str(work), char_tok)
  src_adapter = work / "final" / sft.ADAPTER
  want = st_numpy.load_file(src_adapter / lora.PEFT_WEIGHTS)
  # By hand: layer 1's v_proj lora_B.weight is B^T [out = G H = 16, r = 2].
  key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
  b = np.asarray(adapters["layers"][1]["attn"]["v_proj_lora"]["lora_b"])
  npt.assert_array_equal(want[key], b.T)
  src, out, written = export.export(work, tmp_path / "out", source="final",
                                    dtype=dtype)
  assert (src.kind, written) == ("final", True)
  got = st_numpy.load_file(os.path.join(out, export.ADAPTER,
                                        lora.PEFT_WEIGHTS))
  assert set(got) == set(want) and len(got) == 2 * 7 * cfg.num_layers
  np_dtype = np.dtype(getattr(jnp, dtype))
  for name, value in want.items():
    assert got[name].dtype == np_dtype, name
    npt.assert_array_equal(got[name], value.astype(np_dtype), err_msg=name)
  if dtype == "bfloat16":  # really converted: rounded, not the f32 bits
    assert not np.array_equal(got[key].astype(np.float32), want[key])
  assert json.loads((tmp_path / "out" / export.ADAPTER / lora.PEFT_CONFIG
                     ).read_text()) == json.loads(
                         (src_adapter / lora.PEFT_CONFIG).read_text())
  # The merge beside it is in `dtype` too.
  merged = st_numpy.load_file(os.path.join(out, hf.SAFETENSORS))
  assert {v.dtype for v in merged.values()} == {np_dtype}
  # A plain HF dir (no adapter/) exports without one.
  model = nnx.merge(llama.abstract_model(lora.base_config(cfg))[0],
                    student_lib._random_params(lora.base_config(cfg), 0))  # pylint: disable=protected-access
  sft.write_model_dir(nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model)),
                      char_tok, str(tmp_path / "plain" / "final"), "DONE", {})
  _, out, _ = export.export(tmp_path / "plain", tmp_path / "out2",
                            source="final", dtype=dtype)
  assert not os.path.exists(os.path.join(out, export.ADAPTER))


# ----------------------------------------------------------------------------
# Stage 2 DPO and LDL on a LoRA student

TARGETS = ("q_proj", "up_proj")  # a subset: the rest must not move


def _rl_config(recipe, **kw):
  from tests import train_fixtures  # pylint: disable=g-import-not-at-top
  return train_fixtures.tiny_config(**{
      "recipe": recipe, "rl.steps": 2, "sft.steps": 1, "model.lora.rank": 4,
      "model.lora.targets": TARGETS, "log.tensorboard": False,
      "ranking.yes_word": "Y", "ranking.no_word": "N",
      "ckpt.async_save": False, "ckpt.every_steps": 1,
      "ckpt.keep_finished": "all", **kw})


def _ckpt_params(workdir, recipe, step):
  from tests.test_lora import _ckpt_param_paths  # pylint: disable=g-import-not-at-top
  return _ckpt_param_paths(os.path.join(workdir, "ckpt", recipe, str(step)))


@pytest.mark.parametrize("recipe", ["dpo", "ldl"])
def test_dpo_and_ldl_on_a_lora_student_end_to_end(recipe, tmp_path,
                                                   jit_cache):  # noqa: F811
  """Stage 2 on adapters over the frozen reference: the first step's
  policy IS the reference (B = 0), so DPO's sigmoid loss is log 2 and
  LDL's implied distribution is uniform over the M members (its entropy
  log M, the loss KL(d || uniform) = log M - H(d)); the checkpoints hold
  the adapters alone; final/ differs from reference/ only in the targets'
  weights, and final/adapter/ holds B != 0 on reference/."""
  import re  # pylint: disable=g-import-not-at-top
  from purld_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from purld_jax.train import pu_rl  # pylint: disable=g-import-not-at-top
  c = _rl_config(recipe)
  out = pu_rl.run(c, str(tmp_path))
  rows = [r for r in metrics_lib.read(str(tmp_path)) if r["stage"] == recipe]
  assert [r["step"] for r in rows] == [1, 2]
  first = rows[0]
  assert first["grad_norm"] > 0 and first["skipped"] == 0.0, first
  if recipe == "dpo":
    npt.assert_allclose(first["loss"], np.log(2.0), rtol=1e-6)
  else:
    m = c.sampling.num_candidates + int(c.pu.include_anchor)
    npt.assert_allclose(first["entropy_implied"], np.log(m), rtol=1e-5)
    npt.assert_allclose(first["loss"], np.log(m) - first["entropy_label"],
                        rtol=1e-5, atol=1e-6)
    assert first["loss"] > 0  # d is not uniform: a signal to fit
  assert rows[1]["loss"] != first["loss"]  # the adapters moved
  for step in (1, 2):
    paths = _ckpt_params(str(tmp_path), recipe, step)
    assert {re.search(r"'(\w+_lora)'", p).group(1) for p in paths} == {
        t + lora.SUFFIX for t in TARGETS}, sorted(paths)
  ref = st_numpy.load_file(tmp_path / "reference" / hf.SAFETENSORS)
  final = st_numpy.load_file(os.path.join(out, hf.SAFETENSORS))
  assert set(ref) == set(final)
  changed = {n for n in ref if not np.array_equal(ref[n], final[n])}
  assert {n.split(".")[-2] for n in changed} == set(TARGETS), sorted(changed)
  peft = st_numpy.load_file(os.path.join(out, sft.ADAPTER, lora.PEFT_WEIGHTS))
  assert len(peft) == 2 * len(TARGETS) * 2
  assert all(np.any(v != 0) for k, v in peft.items() if "lora_B" in k)
  meta = json.loads((tmp_path / "final" / sft.ADAPTER / lora.PEFT_CONFIG
                     ).read_text())
  assert meta["base_model_name_or_path"] == sft.reference_dir(str(tmp_path))


# ----------------------------------------------------------------------------
# kill -9 during a LoRA stage 2, resumed in another process

N = 2  # kill after N steps, resume to 2N


@pytest.mark.slow
def test_lora_dpo_exact_resume_after_kill_9(tmp_path, jit_cache):  # noqa: F811
  """test_train_pu_rl.py's kill -9 test on a LoRA student (rank 4, all
  targets): N DPO steps in a child, SIGKILL once step N is checkpointed,
  resume to 2N here; the adapters, their Adam state, step and rng are
  bit-identical to an uninterrupted 2N run's, and so is final/adapter/."""
  from purld_jax import ledger as ledger_lib  # pylint: disable=g-import-not-at-top
  from purld_jax.train import pu_rl  # pylint: disable=g-import-not-at-top
  from tests import train_fixtures  # pylint: disable=g-import-not-at-top
  from tests.test_train_sft import _assert_bit_identical  # pylint: disable=g-import-not-at-top
  recipe = "dpo"
  cfg = train_fixtures.tiny_config(**{
      "recipe": recipe, "rl.steps": 2 * N, "sft.steps": 1,
      "ckpt.every_steps": N, "log.tensorboard": False,
      "ranking.yes_word": "Y", "ranking.no_word": "N", "model.lora.rank": 4})
  full = str(tmp_path / "full")
  pu_rl.run(cfg, full)

  killed = str(tmp_path / "killed")
  cmd = train_fixtures.rl_command(cfg, killed, 2 * N, N,
                                  "--config.model.lora.rank=4")
  train_fixtures.kill_at_checkpoint(
      cmd, os.path.join(killed, "ckpt", recipe, str(N)))
  assert not os.path.exists(os.path.join(killed, "ckpt", recipe, str(2 * N)))
  assert not os.path.exists(os.path.join(killed, pu_rl.FINAL))
  ledger = ledger_lib.Ledger(killed, create=False)
  before = ledger.stats()
  ledger.close()

  pu_rl.run(cfg, killed)  # stage 1 is done; stage 2 resumes from step N

  got = train_fixtures.restore_rl_arrays(cfg, killed, 2 * N)
  want = train_fixtures.restore_rl_arrays(cfg, full, 2 * N)
  # The checkpoints are the adapters' (7 targets x 2 layers x A, B).
  assert len(jax.tree.leaves(got["params"])) == 2 * 7 * 2
  assert all(k.endswith(lora.SUFFIX)
             for k in got["params"]["layers"][0]["attn"])
  _assert_bit_identical(got, want)
  assert int(got["step"]) == 2 * N
  peft = [st_numpy.load_file(os.path.join(w, pu_rl.FINAL, sft.ADAPTER,
                                          lora.PEFT_WEIGHTS))
          for w in (killed, full)]
  assert set(peft[0]) == set(peft[1])
  for name, value in peft[1].items():
    npt.assert_array_equal(peft[0][name], value, err_msg=name)
  ledger = ledger_lib.Ledger(killed, create=False)
  after = ledger.stats()
  ledger.close()
  assert after.requests == before.requests  # no teacher call after resume
  assert after.asked_after_stored == 0
