"""Qwen2.5-VL: logit parity with transformers (torch, f32) on a tiny random
checkpoint, images through transformers' own processor."""

import json

import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from flax import nnx

from purld_jax import models
from purld_jax.models import hf_config
from purld_jax.models import layers
from purld_jax.models import qwen2_vl
from purld_jax.models import qwen2_vl_hf
from purld_jax.models import qwen2_vl_processing as proc_lib
from purld_jax.models import qwen2_vl_vision
from tests.models import torch_oracle

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SPECIALS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
            "<|video_pad|>", "<|im_end|>"]
WORDS = "User Assistant : what is in the picture ? a cat dog and".split()
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
# 4 x 4 patches, merge 2, windows of 2 x 2 merge blocks (16 pixels)
VISION = dict(depth=3, hidden_size=16, intermediate_size=24, num_heads=2,
              patch_size=4, temporal_patch_size=2, spatial_merge_size=2,
              window_size=16, out_hidden_size=32, fullatt_block_indexes=[1])
PIXELS = dict(min_pixels=8 * 8, max_pixels=64 * 64)


def _write_tokenizer(path):
  """A word-level tokenizer with the processor's special tokens."""
  import tokenizers
  vocab = {w: i for i, w in enumerate(["<pad>", "<unk>"] + SPECIALS + WORDS)}
  core = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      vocab, unk_token="<unk>"))
  core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
      eos_token="<|im_end|>", additional_special_tokens=SPECIALS)
  tok.save_pretrained(str(path))
  return transformers.AutoTokenizer.from_pretrained(str(path))


def _make_reference(out_dir, tok, *, tie=False, seed=0):
  """A random tiny Qwen2_5_VLForConditionalGeneration saved to out_dir."""
  ids = {k: tok.convert_tokens_to_ids(v) for k, v in (
      ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
      ("vision_start_token_id", "<|vision_start|>"),
      ("vision_end_token_id", "<|vision_end|>"))}
  cfg = transformers.Qwen2_5_VLConfig(
      text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, rms_norm_eps=1e-6,
                       max_position_embeddings=512, bos_token_id=None,
                       eos_token_id=tok.eos_token_id,
                       rope_parameters={"rope_type": "default",
                                        "rope_theta": 10000.0,
                                        "mrope_section": [1, 1, 2]}),
      vision_config=VISION, tie_word_embeddings=tie, **ids)
  torch.manual_seed(seed)
  return torch_oracle.randomized_save(
      transformers.Qwen2_5_VLForConditionalGeneration(cfg), out_dir)


def _image(seed, h, w):
  rng = np.random.default_rng(seed)
  return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tok = _write_tokenizer(tmp_path_factory.mktemp("tok"))
  d = tmp_path_factory.mktemp("qwen2_5_vl")
  ref = _make_reference(d, tok)
  model = qwen2_vl_hf.load_model(d)
  proc = proc_lib.processor(tok, model.cfg,
                            proc_lib.image_processor(model.cfg, **PIXELS))
  return d, ref, model, proc


def _torch_kwargs(batch, image_token_id):
  ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
  kw = dict(input_ids=ids, attention_mask=torch.from_numpy(
      batch["attention_mask"].astype(np.int64)),
            mm_token_type_ids=(ids == image_token_id).long())
  if "pixel_values" in batch:
    kw["pixel_values"] = torch.from_numpy(batch["pixel_values"])
    kw["image_grid_thw"] = torch.from_numpy(batch["image_grid_thw"])
  return kw


def _torch_logits(ref, batch):
  """Logits of the transformers model: it builds its own M-RoPE positions
  (get_rope_index) from the grids and the image tokens."""
  ref.model.rope_deltas = None
  with torch.no_grad():
    return ref(**_torch_kwargs(batch, ref.config.image_token_id)
               ).logits.float().numpy()


def _our_logits(model, batch):
  pv = batch.get("pixel_values")
  return np.asarray(model(
      jnp.asarray(batch["input_ids"]),
      None if pv is None else jnp.asarray(pv),
      batch.get("vision_inputs"), positions=jnp.asarray(batch["positions"]),
      attention_mask=jnp.asarray(batch["attention_mask"])))


def _assert_close_on_real(got, want, mask):
  m = np.asarray(mask, bool)
  np.testing.assert_allclose(got[m], want[m], atol=1e-4, rtol=0)


def test_one_image_matches_transformers(setup):
  _, ref, model, proc = setup
  batch = proc_lib.preprocess(proc, model.cfg,
                              [f"User : {IMG} what is in the picture ?"],
                              [[_image(1, 48, 40)]])
  # 12 x 10 patches: 6 x 5 merge blocks, windows of 2 x 2 (some partial)
  np.testing.assert_array_equal(batch["image_grid_thw"], [[1, 12, 10]])
  got, want = _our_logits(model, batch), _torch_logits(ref, batch)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_image_features_match_transformers(setup):
  _, ref, model, proc = setup
  batch = proc_lib.preprocess(proc, model.cfg, [f"{IMG} a {IMG}"],
                              [[_image(2, 40, 56), _image(3, 24, 24)]])
  with torch.no_grad():
    want = torch.cat(ref.model.get_image_features(
        torch.from_numpy(batch["pixel_values"]),
        torch.from_numpy(batch["image_grid_thw"])).pooler_output).numpy()
  got = model.image_features(jnp.asarray(batch["pixel_values"]),
                             batch["vision_inputs"])
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_two_images_in_one_prompt_match(setup):
  _, ref, model, proc = setup
  batch = proc_lib.preprocess(
      proc, model.cfg, [f"User : {IMG} a cat and {IMG} a dog ?"],
      [[_image(4, 30, 60), _image(5, 56, 40)]])
  assert len(batch["image_grid_thw"]) == 2
  np.testing.assert_allclose(_our_logits(model, batch),
                             _torch_logits(ref, batch), atol=1e-4, rtol=0)


def test_rope_index_matches_transformers(setup):
  """Positions of a left-padded batch: text continues from the image's
  largest position + 1; padding 0."""
  _, ref, model, proc = setup
  batch = proc_lib.preprocess(
      proc, model.cfg, [f"a {IMG} cat ? {IMG}", f"{IMG} what", "a dog"],
      [[_image(6, 40, 24), _image(7, 16, 32)], [_image(8, 48, 48)], []])
  kw = _torch_kwargs(batch, ref.config.image_token_id)
  want, _ = ref.model.get_rope_index(
      kw["input_ids"], kw["mm_token_type_ids"], kw["image_grid_thw"],
      attention_mask=kw["attention_mask"])
  np.testing.assert_array_equal(batch["positions"], want.numpy())
  # the text after row 1's 6 x 6 image: 1 + 6 = 7 on all three components
  row = batch["positions"][:, 1][:, batch["attention_mask"][1]]
  np.testing.assert_array_equal(row[:, -2:], [[7, 8]] * 3)


def test_left_padded_batch_matches(setup):
  """Rows with 1, 2 and no images, left-padded."""
  _, ref, model, proc = setup
  batch = proc_lib.preprocess(
      proc, model.cfg, [f"User : {IMG} what is in the picture ? a cat",
                        f"{IMG} and {IMG} what ?", "a dog"],
      [[_image(9, 40, 32)], [_image(10, 24, 40), _image(11, 32, 32)], []])
  mask = batch["attention_mask"]
  assert (~mask[:, 0]).sum() == 2 and mask[:, -1].all()
  _assert_close_on_real(_our_logits(model, batch), _torch_logits(ref, batch),
                        mask)


def test_text_only_matches(setup):
  _, ref, model, proc = setup
  batch = proc_lib.preprocess(proc, model.cfg, ["User : what ?", "a cat"],
                              [[], []])
  got = _our_logits(model, batch)
  with torch.no_grad():  # transformers counts positions from 0 per row
    want = ref(**_torch_kwargs(batch, ref.config.image_token_id),
               position_ids=torch.from_numpy(
                   batch["positions"].astype(np.int64))).logits.numpy()
  _assert_close_on_real(got, want, batch["attention_mask"])


def test_load_through_models_and_save_for_transformers(setup, tmp_path):
  d, _, model, proc = setup
  again_ours = models.load_model(d)
  assert isinstance(again_ours, qwen2_vl.Qwen2VL)
  models.save_pretrained(again_ours, proc.tokenizer, tmp_path / "out")
  again = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      str(tmp_path / "out"), dtype=torch.float32).eval()
  batch = proc_lib.preprocess(proc, model.cfg, [f"User : {IMG} a cat"],
                              [[_image(12, 40, 48)]])
  np.testing.assert_allclose(_torch_logits(again, batch),
                             _our_logits(model, batch), atol=1e-4, rtol=0)
  cfg = json.loads((tmp_path / "out" / "config.json").read_text())
  assert cfg["model_type"] == "qwen2_5_vl"
  assert cfg["text_config"]["rope_parameters"]["mrope_section"] == [1, 1, 2]


def test_legacy_tensor_names_and_flat_config_load(setup, tmp_path):
  """The published checkpoints' layout: `visual.*` / `model.*` tensors and
  the text fields at the top level of config.json."""
  from safetensors.numpy import load_file, save_file
  d, _, model, proc = setup
  tensors = load_file(str(d / "model.safetensors"))
  renamed = {k.replace("model.visual.", "visual.")
             .replace("model.language_model.", "model."): v
             for k, v in tensors.items()}
  save_file(renamed, str(tmp_path / "model.safetensors"))
  raw = json.loads((d / "config.json").read_text())
  text = raw.pop("text_config")
  rope = text.pop("rope_parameters")
  text["rope_scaling"] = {"type": "mrope",
                          "mrope_section": rope["mrope_section"]}
  text["rope_theta"] = rope["rope_theta"]
  raw.update(text)
  raw["model_type"] = "qwen2_5_vl"
  (tmp_path / "config.json").write_text(json.dumps(raw))
  legacy = qwen2_vl_hf.load_model(tmp_path)
  assert legacy.cfg == model.cfg
  batch = proc_lib.preprocess(proc, model.cfg, [f"{IMG} a dog"],
                              [[_image(13, 32, 24)]])
  np.testing.assert_array_equal(_our_logits(legacy, batch),
                                _our_logits(model, batch))


def test_key_table_names_match_the_transformers_state_dict(setup):
  _, ref, model, _ = setup
  ours = [e.hf_name for e in qwen2_vl_hf.key_table(model.cfg)]
  assert sorted(ours) == sorted(ref.state_dict())
  assert len(set(ours)) == len(ours)


@pytest.mark.parametrize("field,value,needle", [
    ("model_type", "qwen2_vl", "model_type='qwen2_vl'"),
    ("vision_config.hidden_act", "quick_gelu", "vision_config.hidden_act"),
    ("text_config.rope_parameters", {"rope_type": "default",
                                     "mrope_section": [1, 1, 1]},
     "mrope_section"),
])
def test_unsupported_config_names_file_and_field(setup, tmp_path, field,
                                                 value, needle):
  d, *_ = setup
  raw = json.loads((d / "config.json").read_text())
  node, *rest = field.split(".")
  if rest:
    raw[node][rest[0]] = value
  else:
    raw[node] = value
  (tmp_path / "config.json").write_text(json.dumps(raw))
  with pytest.raises(hf_config.ConfigError) as e:
    qwen2_vl_hf.load_model(tmp_path)
  msg = str(e.value)
  assert str(tmp_path / "config.json") in msg and needle in msg
  assert len(msg) < 250


def test_mrope_with_equal_components_is_plain_rope():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, 3, 8)), jnp.float32)
  pos = jnp.asarray(rng.integers(0, 50, (2, 5)), jnp.int32)
  inv = 1.0 / (10000.0 ** (jnp.arange(0, 8, 2, dtype=jnp.float32) / 8))
  np.testing.assert_array_equal(
      np.asarray(layers.apply_rope(x, jnp.stack([pos] * 3), inv, (1, 1, 2))),
      np.asarray(layers.apply_rope(x, pos, inv)))


def test_vision_inputs_by_hand():
  """A 4 x 6 patch grid, merge 2, windows of 2 x 2 blocks: blocks laid out
  row-major, patches of a block row-major; 1 x 2 windows (the second one
  partial, 2 x 1 blocks)."""
  cfg = qwen2_vl_vision.VisionConfig(patch_size=4, window_size=16,
                                     spatial_merge_size=2)
  vis = qwen2_vl_vision.vision_inputs(np.array([[1, 4, 6], [1, 2, 2]]), cfg)
  rc = vis["rows_cols"]
  np.testing.assert_array_equal(rc[:8], [[0, 0], [0, 1], [1, 0], [1, 1],
                                         [0, 2], [0, 3], [1, 2], [1, 3]])
  blocks = vis["windows"][:24:4]  # block (r, c) for r < 2, c < 3
  np.testing.assert_array_equal(blocks, [0, 0, 1, 0, 0, 1])
  np.testing.assert_array_equal(vis["frames"], [0] * 24 + [1] * 4)
  assert (vis["windows"][24:] == 2).all()


def test_cached_greedy_decoding_matches_generate(setup):
  """Prefill through `text.extend` with the M-RoPE positions, then one
  token a step at the row's next position: transformers' greedy tokens."""
  _, ref, model, proc = setup
  n = 5
  batch = proc_lib.preprocess(
      proc, model.cfg, [f"User : {IMG} what is in the picture ?",
                        f"{IMG} a {IMG} dog"],
      [[_image(14, 40, 32)], [_image(15, 24, 24), _image(16, 32, 16)]])
  tokens = jnp.asarray(batch["input_ids"])
  mask = jnp.asarray(batch["attention_mask"])
  feats = nnx.jit(lambda m, pv, vis: m.image_features(pv, vis))(
      model, jnp.asarray(batch["pixel_values"]), batch["vision_inputs"])
  cache = model.text.init_cache(2, tokens.shape[1] + n)
  logits, cache = model.text.extend(
      None, cache, positions=jnp.asarray(batch["positions"]),
      attention_mask=mask, embeds=model.embed(tokens, feats))
  pos = qwen2_vl.next_position(batch["positions"])
  out = []
  for _ in range(n):
    tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out.append(np.asarray(tok))
    logits, cache = model.text.extend(
        tok[:, None], cache, positions=jnp.broadcast_to(pos[None, :, None],
                                                        (3, 2, 1)),
        attention_mask=jnp.ones((2, 1), bool))
    pos = pos + 1
  ref.model.rope_deltas = None
  with torch.no_grad():
    want = ref.generate(**_torch_kwargs(batch, ref.config.image_token_id),
                        max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0)
  np.testing.assert_array_equal(np.stack(out, 1),
                                want[:, tokens.shape[1]:].numpy())


def test_every_parameter_has_logical_axes_with_rules(setup):
  """The vision tower shards by sharding.py's rules: heads and mlp on
  tensor, the merger's input on tensor, its width on fsdp."""
  import jax
  from purld_jax import sharding
  _, _, model, _ = setup
  names = sharding.logical_axes(model)
  mesh = sharding.make_mesh((2, 2, 2))  # 2 heads split on tensor 2
  shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  specs = jax.tree.map(
      lambda n, x: sharding.spec(n, sharding.DEFAULT_RULES, mesh, x.shape),
      names, shapes, is_leaf=lambda x: isinstance(x, tuple))
  vision = specs["vision"]
  assert vision["merger_fc1"] == jax.sharding.PartitionSpec("tensor", None)
  assert vision["layers"][0]["mlp"]["gate_proj"] == jax.sharding.PartitionSpec(
      "fsdp", "tensor")
  assert vision["layers"][0]["attn"]["qkv"] == jax.sharding.PartitionSpec(
      "fsdp", None, "tensor", None)


def test_load_processor_from_a_model_directory(setup, tmp_path):
  """Tokenizer and preprocessor_config.json read back from a directory."""
  *_, model, proc = setup
  proc.tokenizer.save_pretrained(str(tmp_path))
  proc.image_processor.save_pretrained(str(tmp_path))
  cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
  assert cfg.get("processor_class") in (None, "Qwen2_5_VLProcessor")
  again = proc_lib.load_processor(tmp_path, model.cfg)
  args = (model.cfg, [f"{IMG} a cat"], [[_image(17, 200, 300)]])
  a, b = proc_lib.preprocess(proc, *args), proc_lib.preprocess(again, *args)
  for key in ("input_ids", "pixel_values", "image_grid_thw", "positions"):
    np.testing.assert_array_equal(a[key], b[key])
  assert a["image_grid_thw"].prod() == 4 * (a["input_ids"] ==
                                            model.cfg.image_token_id).sum()


def test_image_token_count_is_checked(setup):
  *_, model, proc = setup
  batch = proc_lib.preprocess(proc, model.cfg, [f"{IMG} a cat"],
                              [[_image(18, 16, 16)]])
  ids = batch["input_ids"].copy()
  ids[0, np.argmax(ids[0] == model.cfg.image_token_id)] = 0
  with pytest.raises(ValueError, match="3 image tokens"):
    qwen2_vl.check_image_tokens(ids, batch["image_grid_thw"], model.cfg)
  with pytest.raises(ValueError, match="row 0: image 0 needs 4 image tokens"):
    qwen2_vl.rope_index(ids, batch["attention_mask"],
                        batch["image_grid_thw"], model.cfg)
