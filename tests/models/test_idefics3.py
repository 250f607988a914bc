"""Idefics3 / SmolVLM: logit parity with transformers (torch, f32) on tiny
random checkpoints, images through transformers' own processor."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from purld_jax.models import hf_config
from purld_jax.models import idefics3
from purld_jax.models import idefics3_hf
from purld_jax.models import idefics3_processing as proc_lib
from tests.core_fixtures import random_tiny_model
from tests.models import torch_oracle

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMAGE_SIZE, PATCH = 182, 13  # 14 x 14 patches, scale 2: 49 tokens a tile
S = (IMAGE_SIZE // PATCH // 2) ** 2
IMAGE_SPECIALS = (["<fake_token_around_image>", "<image>", "<global-img>",
                   "<end_of_utterance>"]
                  + [f"<row_{i}_col_{j}>" for i in range(1, 7)
                     for j in range(1, 7)])
WORDS = "User Assistant : what is in the picture ? a cat dog and".split()


def _write_tokenizer(path):
  """A word-level tokenizer with the processor's special tokens."""
  import tokenizers
  specials = ["<pad>", "<unk>"] + IMAGE_SPECIALS
  vocab = {w: i for i, w in enumerate(specials + WORDS)}
  core = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      vocab, unk_token="<unk>"))
  core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
      additional_special_tokens=IMAGE_SPECIALS)
  tok.save_pretrained(str(path))
  return transformers.AutoTokenizer.from_pretrained(str(path))


def _make_reference(out_dir, image_token_id, *, model_type="idefics3",
                    tie=False, seed=0):
  """A random tiny Idefics3/SmolVLM ForConditionalGeneration saved to
  out_dir. Norm scales and biases are random too."""
  prefix = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}[model_type]
  cfg = getattr(transformers, prefix + "Config")(
      text_config=dict(model_type="llama", vocab_size=128, hidden_size=32,
                       intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, rms_norm_eps=1e-6,
                       pad_token_id=0),
      vision_config=dict(hidden_size=24, intermediate_size=40,
                         num_hidden_layers=2, num_attention_heads=2,
                         image_size=IMAGE_SIZE, patch_size=PATCH),
      scale_factor=2, image_token_id=image_token_id,
      tie_word_embeddings=tie)
  torch.manual_seed(seed)
  return torch_oracle.randomized_save(
      getattr(transformers, prefix + "ForConditionalGeneration")(cfg),
      out_dir)


def _image(seed, h, w):
  rng = np.random.default_rng(seed)
  return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tok = _write_tokenizer(tmp_path_factory.mktemp("tok"))
  image_id = tok.convert_tokens_to_ids("<image>")
  d = tmp_path_factory.mktemp("idefics3")
  ref = _make_reference(d, image_id)
  model = idefics3_hf.load_model(d)
  proc = proc_lib.processor(tok, model.cfg, proc_lib.image_processor(
      max_image_size=IMAGE_SIZE, longest_edge=2 * IMAGE_SIZE))
  return d, ref, model, proc


def _torch_logits(ref, batch):
  """Logits of the transformers model; positions count real tokens."""
  mask = torch.from_numpy(batch["attention_mask"].astype(np.int64))
  kw = dict(input_ids=torch.from_numpy(batch["input_ids"].astype(np.int64)),
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
  if "pixel_values" in batch:
    kw["pixel_values"] = torch.from_numpy(batch["pixel_values"])
    kw["pixel_attention_mask"] = torch.from_numpy(
        batch["pixel_attention_mask"])
  with torch.no_grad():
    return ref(**kw).logits.float().numpy()


def _our_logits(model, batch):
  pv = batch.get("pixel_values")
  pm = batch.get("pixel_attention_mask")
  return np.asarray(model(
      jnp.asarray(batch["input_ids"]),
      None if pv is None else jnp.asarray(pv),
      None if pm is None else jnp.asarray(pm),
      attention_mask=jnp.asarray(batch["attention_mask"])))


def _assert_close_on_real(got, want, mask):
  m = np.asarray(mask, bool)
  np.testing.assert_allclose(got[m], want[m], atol=1e-4, rtol=0)


def test_processor_splits_a_200x300_image_into_5_tiles(setup):
  *_, proc = setup
  batch = proc_lib.preprocess(proc, ["User : <image> what is in the picture ?"],
                              [[_image(0, 200, 300)]])
  assert batch["pixel_values"].shape == (1, 5, 3, IMAGE_SIZE, IMAGE_SIZE)
  assert batch["pixel_attention_mask"].shape == (1, 5, IMAGE_SIZE,
                                                 IMAGE_SIZE)
  ids = batch["input_ids"][0].tolist()
  tok = proc.tokenizer
  assert ids.count(tok.convert_tokens_to_ids("<image>")) == 5 * S
  assert ids.count(tok.convert_tokens_to_ids("<global-img>")) == 1
  # 2 x 2 tiles, each tagged with its row and column
  for tag in ("<row_1_col_1>", "<row_1_col_2>", "<row_2_col_1>",
              "<row_2_col_2>"):
    assert ids.count(tok.convert_tokens_to_ids(tag)) == 1


def test_one_image_matches_transformers(setup):
  _, ref, model, proc = setup
  batch = proc_lib.preprocess(proc, ["User : <image> what is in the picture ?"],
                              [[_image(1, 200, 300)]])
  got, want = _our_logits(model, batch), _torch_logits(ref, batch)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_several_images_in_one_prompt_match(setup):
  _, ref, model, proc = setup
  batch = proc_lib.preprocess(
      proc, ["User : <image> a cat and <image> a dog ? <image>"],
      [[_image(2, 120, 90), _image(3, 60, 200), _image(4, 182, 182)]],
      do_image_splitting=False)
  assert batch["pixel_values"].shape[1] == 3
  np.testing.assert_allclose(_our_logits(model, batch),
                             _torch_logits(ref, batch), atol=1e-4, rtol=0)


def test_left_padded_batch_with_padding_image_slot_matches(setup):
  """Rows with 1 and 2 images: row 0 has an all-zero padding slot."""
  _, ref, model, proc = setup
  batch = proc_lib.preprocess(
      proc, ["User : <image> what is in the picture ? a cat",
             "User : <image> and <image> what ?"],
      [[_image(5, 200, 100)], [_image(6, 100, 200), _image(7, 150, 150)]],
      do_image_splitting=False)
  pv = batch["pixel_values"]
  assert pv.shape[:2] == (2, 2) and not pv[0, 1].any() and pv[1, 1].any()
  mask = batch["attention_mask"]
  assert not mask[0, 0] and mask[:, -1].all()  # row 0 is left-padded
  got, want = _our_logits(model, batch), _torch_logits(ref, batch)
  _assert_close_on_real(got, want, batch["attention_mask"])


def test_partially_padded_tile_matches(setup):
  """A tile whose lower right is padding (pixel mask 0): the real patches'
  position ids stretch over the grid as transformers' do."""
  _, ref, model, proc = setup
  batch = proc_lib.preprocess(proc, ["<image> a cat", "<image> a dog"],
                              [[_image(8, 90, 90)], [_image(9, 90, 90)]],
                              do_image_splitting=False)
  batch["pixel_attention_mask"][0, 0, 100:, :] = False
  batch["pixel_attention_mask"][0, 0, :, 60:] = False
  batch["pixel_values"][0, 0][:, ~batch["pixel_attention_mask"][0, 0]] = 0
  got, want = _our_logits(model, batch), _torch_logits(ref, batch)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # and the mask matters: without it row 0 changes
  full = dict(batch, pixel_attention_mask=np.ones_like(
      batch["pixel_attention_mask"]))
  assert np.abs(_our_logits(model, full)[0] - got[0]).max() > 1e-3


def test_cached_prefill_from_separate_steps_equals_forward(setup):
  """image_features -> embed -> text.extend (the prefix-sharing path),
  the first two jitted."""
  _, _, model, proc = setup
  batch = proc_lib.preprocess(proc, ["<image> a cat ?", "a <image> dog"],
                              [[_image(10, 80, 120)], [_image(11, 64, 64)]],
                              do_image_splitting=False)
  tokens = jnp.asarray(batch["input_ids"])
  mask = jnp.asarray(batch["attention_mask"])
  from flax import nnx
  feats, valid = nnx.jit(lambda m, pv, pm: m.image_features(pv, pm))(
      model, jnp.asarray(batch["pixel_values"]),
      jnp.asarray(batch["pixel_attention_mask"]))
  x = nnx.jit(lambda m, t, f, v: m.embed(t, f, v))(model, tokens, feats,
                                                  valid)
  positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
  cache = model.text.init_cache(2, tokens.shape[1] + 4)
  got, _ = model.text.extend(None, cache, positions=positions,
                             attention_mask=mask, embeds=x)
  want = _our_logits(model, batch)
  _assert_close_on_real(np.asarray(got), want, batch["attention_mask"])


def test_save_and_load_in_transformers(setup, tmp_path):
  _, _, model, proc = setup
  idefics3_hf.save_model(model, tmp_path / "out")
  again = transformers.Idefics3ForConditionalGeneration.from_pretrained(
      str(tmp_path / "out"), dtype=torch.float32).eval()
  batch = proc_lib.preprocess(proc, ["User : <image> a cat"],
                              [[_image(12, 150, 100)]],
                              do_image_splitting=False)
  np.testing.assert_allclose(_torch_logits(again, batch),
                             _our_logits(model, batch), atol=1e-4, rtol=0)
  cfg = json.loads((tmp_path / "out" / "config.json").read_text())
  assert cfg["model_type"] == "idefics3"


def test_smolvlm_tied_matches_and_round_trips(setup, tmp_path):
  *_, proc = setup
  image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
  ref = _make_reference(tmp_path / "ref", image_id, model_type="smolvlm",
                        tie=True, seed=1)
  names = json.loads(
      (tmp_path / "ref" / "config.json").read_text())
  assert names["model_type"] == "smolvlm"
  model = idefics3_hf.load_model(tmp_path / "ref")
  assert model.cfg.text.tie_word_embeddings
  batch = proc_lib.preprocess(proc, ["<image> what ?"],
                              [[_image(13, 100, 182)]],
                              do_image_splitting=False)
  ours = _our_logits(model, batch)
  np.testing.assert_allclose(ours, _torch_logits(ref, batch), atol=1e-4,
                             rtol=0)
  idefics3_hf.save_model(model, tmp_path / "out")
  again = transformers.SmolVLMForConditionalGeneration.from_pretrained(
      str(tmp_path / "out"), dtype=torch.float32).eval()
  np.testing.assert_allclose(_torch_logits(again, batch), ours, atol=1e-4,
                             rtol=0)


def test_key_table_names_match_the_transformers_state_dict(setup):
  d, ref, model, _ = setup
  ours = [e.hf_name for e in idefics3_hf.key_table(model.cfg)]
  assert sorted(ours) == sorted(ref.state_dict())
  assert len(set(ours)) == len(ours)


def test_unsupported_model_type_names_file_and_field(setup, tmp_path):
  d, *_ = setup
  raw = json.loads((d / "config.json").read_text())
  raw["model_type"] = "llava"
  (tmp_path / "config.json").write_text(json.dumps(raw))
  with pytest.raises(hf_config.ConfigError) as e:
    idefics3_hf.load_model(tmp_path)
  msg = str(e.value)
  assert str(tmp_path / "config.json") in msg and "model_type" in msg
  assert len(msg) < 200


def test_image_token_count_is_checked(setup):
  *_, model, proc = setup
  batch = proc_lib.preprocess(proc, ["<image> a cat"], [[_image(14, 64, 64)]],
                              do_image_splitting=False)
  idefics3.check_image_tokens(batch["input_ids"], batch["pixel_values"],
                              model.cfg)
  ids = batch["input_ids"].copy()
  ids[0, np.argmax(ids[0] == model.cfg.image_token_id)] = 0
  with pytest.raises(ValueError, match=f"row 0: {S - 1} image tokens"):
    idefics3.check_image_tokens(ids, batch["pixel_values"], model.cfg)


def test_pixel_shuffle_by_hand():
  """Output token (r, c) stacks the 2 x 2 block at rows 2r.., columns 2c..
  in row-major order of (column, row) pairs as transformers lays it out."""
  side, e, s = 4, 3, 2
  x = np.arange(side * side * e, dtype=np.float32).reshape(1, side * side, e)
  got = np.asarray(idefics3.pixel_shuffle(jnp.asarray(x), s))
  grid = x.reshape(side, side, e)
  for r in range(side // s):
    for c in range(side // s):
      want = np.concatenate([grid[s * r + i, s * c + j] for i in range(s)
                             for j in range(s)])
      np.testing.assert_array_equal(got[0, r * (side // s) + c], want)


def test_text_only_embeds_path_equals_token_path():
  """`Llama` fed its own embedding rows gives the token path's logits,
  cached and uncached."""
  model = random_tiny_model(vocab_size=64)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 64, (2, 7)), jnp.int32)
  mask = jnp.asarray(np.array([[1] * 7, [0, 0] + [1] * 5], bool))
  x = model.embed_tokens(tokens)
  np.testing.assert_array_equal(
      np.asarray(model(embeds=x, attention_mask=mask)),
      np.asarray(model(tokens, attention_mask=mask)))
  pos = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
  cache = model.init_cache(2, 8)
  a, _ = model.extend(tokens, cache, positions=pos, attention_mask=mask)
  b, _ = model.extend(None, cache, positions=pos, attention_mask=mask,
                      embeds=x)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vision_position_ids_by_hand():
  """A 2 x 3 real region of a 4 x 4 patch grid on a side-4 table."""
  from purld_jax.models import siglip
  m = np.zeros((1, 4, 4), bool)
  m[0, :2, :3] = True
  got = np.asarray(siglip.position_ids(jnp.asarray(m), 4)).reshape(4, 4)
  # rows i/2 -> buckets 0, 2; columns j/3 -> 0, 1, 2
  want = np.zeros((4, 4), int)
  for i, bi in enumerate((0, 2)):
    for j, bj in enumerate((0, 1, 2)):
      want[i, j] = bi * 4 + bj
  np.testing.assert_array_equal(got, want)
  assert jax.numpy.issubdtype(got.dtype, jnp.integer)


def test_every_parameter_has_logical_axes_with_rules(setup):
  """The vision tower and connector shard by sharding.py's rules: the
  layers' heads and mlp on tensor, the connector's input on tensor."""
  from flax import nnx
  from purld_jax import sharding
  _, _, model, _ = setup
  names = sharding.logical_axes(model)
  mesh = sharding.make_mesh((1, 2, 4))
  shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  specs = jax.tree.map(
      lambda n, x: sharding.spec(n, sharding.DEFAULT_RULES, mesh, x.shape),
      names, shapes, is_leaf=lambda x: isinstance(x, tuple))
  assert specs["connector"] == jax.sharding.PartitionSpec("tensor", "fsdp")
  fc1 = specs["vision"]["layers"][0]["mlp"]["fc1"]
  assert fc1 == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert specs["vision"]["position_embed"][0] is None


def test_load_processor_from_a_model_directory(setup, tmp_path):
  """Tokenizer and preprocessor_config.json read back from a directory."""
  *_, model, proc = setup
  proc.tokenizer.save_pretrained(str(tmp_path))
  proc.image_processor.save_pretrained(str(tmp_path))
  again = proc_lib.load_processor(tmp_path, model.cfg)
  batch = proc_lib.preprocess(again, ["<image> a cat"],
                              [[_image(15, 200, 300)]])
  assert batch["pixel_values"].shape == (1, 5, 3, IMAGE_SIZE, IMAGE_SIZE)
  assert (batch["input_ids"] == model.cfg.image_token_id).sum() == 5 * S
