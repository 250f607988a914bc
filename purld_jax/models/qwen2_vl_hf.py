"""Qwen2.5-VL Hugging Face checkpoints <-> NNX parameters.

The key table holds the vision tower's tensors (`model.visual.*`) and the
decoder's, which are hf.py's text table with `model.` read as
`model.language_model.` (lm_head.weight stays). Checkpoints written before
transformers 5 (the published Qwen2.5-VL ones) name them `visual.*` and
`model.*`; `load_model` reads either layout, `save_model` writes the new
one. Each Entry transforms both ways, as in hf.py:
  patch_embed.proj.weight  [E, C, Tp, P, P] -> [K, E]
  attn.qkv.weight          [3*A*H, E]       -> [E, 3, A, H]; bias [3, A, H]
  attn.proj.weight         [E, A*H]         -> [A, H, E]
  mlp.*_proj, merger.mlp.0 / .2  [out, in]  -> [in, out]

  model = load_model(path)         # config.json model_type qwen2_5_vl
  save_model(model, out_dir)       # transformers loads it back
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import jax.numpy as jnp
from flax import nnx

from purld_jax.models import hf
from purld_jax.models import lora
from purld_jax.models import qwen2_vl
from purld_jax.models import qwen2_vl_vision

Entry = hf.Entry
NEW, LEGACY = "transformers5", "legacy"  # tensor-name layouts
_PREFIX = {NEW: ("model.visual.", "model.language_model."),
           LEGACY: ("visual.", "model.")}


def _same(x):
  return x


def vision_table(cfg: qwen2_vl_vision.VisionConfig, hf_prefix: str,
                 path: tuple = ("vision",)) -> list[Entry]:
  """The vision tower's tensors, in HF order."""
  e, a, h, k = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.patch_dim
  same = (_same, _same)
  tr = (lambda w: w.T, lambda w: w.T)
  qkv_in = (lambda w: w.T.reshape(e, 3, a, h),
            lambda w: w.reshape(e, 3 * a * h).T)
  qkv_bias = (lambda b: b.reshape(3, a, h), lambda b: b.reshape(3 * a * h))
  out_in = (lambda w: w.T.reshape(a, h, e), lambda w: w.reshape(a * h, e).T)
  patch_in = (lambda w: w.reshape(e, k).T,
              lambda w: w.T.reshape(e, cfg.num_channels,
                                    cfg.temporal_patch_size, cfg.patch_size,
                                    cfg.patch_size))
  t = [Entry(hf_prefix + "patch_embed.proj.weight", path + ("patch_embed",),
             *patch_in)]
  for i in range(cfg.num_layers):
    q = f"{hf_prefix}blocks.{i}."
    lp = path + ("layers", i)
    t += [Entry(q + "norm1.weight", lp + ("norm1", "scale"), *same),
          Entry(q + "norm2.weight", lp + ("norm2", "scale"), *same),
          Entry(q + "attn.qkv.weight", lp + ("attn", "qkv"), *qkv_in),
          Entry(q + "attn.qkv.bias", lp + ("attn", "qkv_bias"), *qkv_bias),
          Entry(q + "attn.proj.weight", lp + ("attn", "o_proj"), *out_in),
          Entry(q + "attn.proj.bias", lp + ("attn", "o_bias"), *same)]
    for n in ("gate", "up", "down"):
      t += [Entry(q + f"mlp.{n}_proj.weight", lp + ("mlp", f"{n}_proj"), *tr),
            Entry(q + f"mlp.{n}_proj.bias", lp + ("mlp", f"{n}_bias"),
                  *same)]
  m = hf_prefix + "merger."
  t += [Entry(m + "ln_q.weight", path + ("merger_norm", "scale"), *same),
        Entry(m + "mlp.0.weight", path + ("merger_fc1",), *tr),
        Entry(m + "mlp.0.bias", path + ("merger_fc1_bias",), *same),
        Entry(m + "mlp.2.weight", path + ("merger_fc2",), *tr),
        Entry(m + "mlp.2.bias", path + ("merger_fc2_bias",), *same)]
  return t


def key_table(cfg: qwen2_vl.Qwen2VLConfig, layout: str = NEW
              ) -> list[Entry]:
  """Every tensor of a Qwen2_5_VLForConditionalGeneration checkpoint, named
  as `layout` (NEW: transformers 5, LEGACY: the published checkpoints)."""
  vision_prefix, text_prefix = _PREFIX[layout]
  t = vision_table(cfg.vision, vision_prefix)
  return t + hf.text_table(cfg.text, text_prefix)


def read_config(path: str | os.PathLike, **dtypes) -> qwen2_vl.Qwen2VLConfig:
  """Qwen2VLConfig from `path/config.json` (errors name file and field)."""
  raw, f = hf.read_json(path)
  return qwen2_vl.Qwen2VLConfig.from_hf(raw, source=str(f), **dtypes)


def abstract_model(cfg: qwen2_vl.Qwen2VLConfig):
  """(graphdef, pure-dict param shapes) of `Qwen2VL(cfg)`, no weights."""
  return hf.abstract_shapes(lambda rngs: qwen2_vl.Qwen2VL(cfg, rngs=rngs))


def layout_of(path: str | os.PathLike) -> str:
  """NEW or LEGACY: how the directory's tensors are named."""
  names = hf.tensor_names(path)
  return NEW if "model.visual.patch_embed.proj.weight" in names else LEGACY


def load_params(path: str | os.PathLike, cfg: qwen2_vl.Qwen2VLConfig, *,
                shardings=None) -> dict:
  """The pure-dict params of `Qwen2VL(cfg)` from a Hugging Face directory
  (either layout; cfg without adapters; its dtypes decide the arrays')."""
  base = dataclasses.replace(cfg, text=lora.base_config(cfg.text))
  _, shapes = abstract_model(base)
  return hf.load_table(path, key_table(base, layout_of(path)), shapes,
                       cfg.text.param_dtype, shardings=shardings)


def load_model(path: str | os.PathLike, *, dtype=jnp.float32,
               param_dtype=None, shardings=None) -> qwen2_vl.Qwen2VL:
  """A `Qwen2VL` with the weights of a Hugging Face directory.

  Raises:
    hf_config.ConfigError / hf.CheckpointError naming the file and the
    field or tensor.
  """
  cfg = read_config(path, dtype=dtype, param_dtype=param_dtype or dtype)
  base = dataclasses.replace(cfg, text=lora.base_config(cfg.text))
  graphdef, shapes = abstract_model(base)  # traced once, not again below
  return nnx.merge(graphdef, hf.load_table(
      path, key_table(base, layout_of(path)), shapes, cfg.text.param_dtype,
      shardings=shardings))


def save_model(model: qwen2_vl.Qwen2VL, path: str | os.PathLike, *,
               dtype=None, extra_config: dict | None = None,
               max_shard_bytes: int | None = None) -> None:
  """Writes config.json and safetensors transformers loads as
  `Qwen2_5_VLForConditionalGeneration`; LoRA adapters of the decoder are
  folded into its weights."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params["text"] = lora.fold(params["text"], model.cfg.text)
  cfg = dataclasses.replace(model.cfg,
                            text=lora.base_config(model.cfg.text))
  tensors = hf.table_tensors(params, key_table(cfg), dtype=dtype)
  dtype_name = str(next(iter(tensors.values())).dtype)
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  hf.write_checkpoint(path, cfg.to_hf(torch_dtype=dtype_name,
                                      extra=extra_config),
                      tensors, max_shard_bytes=max_shard_bytes)
