"""Logit parity with transformers (torch, f32) on tiny random checkpoints."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from purld_jax import models
from purld_jax.models import tokenizer as tok_lib
from tests.models import torch_oracle

VARIANTS = sorted(torch_oracle.VARIANTS)


@pytest.fixture(scope="module", params=VARIANTS)
def checkpoint(request, tmp_path_factory):
  d = tmp_path_factory.mktemp(request.param)
  ref = torch_oracle.make_checkpoint(request.param, d)
  return request.param, d, ref


def _tokens(seed, b, t, v):
  return np.random.default_rng(seed).integers(0, v, (b, t), dtype=np.int32)


def test_logits_match_transformers(checkpoint):
  _, d, ref = checkpoint
  model = models.load_model(d)
  tokens = _tokens(0, 2, 11, model.cfg.vocab_size)
  want = torch_oracle.torch_logits(ref, tokens)
  got = np.asarray(model(jnp.asarray(tokens)))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_left_padded_rows_equal_unpadded(checkpoint):
  """A left-padded batch gives each row the logits transformers gives it alone."""
  _, d, ref = checkpoint
  model = models.load_model(d)
  v = model.cfg.vocab_size
  rows = [list(_tokens(1, 1, n, v)[0]) for n in (9, 4, 6)]
  tokens, mask = tok_lib.pad_left(rows, pad_id=0)
  got = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
  for i, row in enumerate(rows):
    want = torch_oracle.torch_logits(ref, np.asarray([row]))[0]
    np.testing.assert_allclose(got[i, -len(row):], want, atol=1e-4, rtol=0)


def test_round_trip_through_save_pretrained(checkpoint, tmp_path):
  """save_pretrained output loads in transformers with the same logits."""
  name, d, _ = checkpoint
  model = models.load_model(d)
  models.save_pretrained(model, None, tmp_path / "out")
  model_cls = torch_oracle.VARIANTS[name][0]
  reloaded = getattr(torch_oracle.transformers, model_cls).from_pretrained(
      str(tmp_path / "out"), dtype=torch_oracle.torch.float32).eval()
  tokens = _tokens(2, 2, 7, model.cfg.vocab_size)
  want = np.asarray(model(jnp.asarray(tokens)))
  got = torch_oracle.torch_logits(reloaded, tokens)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  cfg = json.loads((tmp_path / "out" / "config.json").read_text())
  assert cfg["model_type"] == model.cfg.model_type


def test_sharded_checkpoint_round_trip(tmp_path):
  """Writing with a small shard size gives an index that loads back equal."""
  ref_dir = tmp_path / "ref"
  torch_oracle.make_checkpoint("llama_untied", ref_dir)
  model = models.load_model(ref_dir)
  models.save_pretrained(model, None, tmp_path / "sharded",
                         max_shard_bytes=20_000)
  files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 1
  again = models.load_model(tmp_path / "sharded")
  tokens = jnp.asarray(_tokens(3, 1, 5, model.cfg.vocab_size))
  np.testing.assert_array_equal(np.asarray(again(tokens)),
                                np.asarray(model(tokens)))
