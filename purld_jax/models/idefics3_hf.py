"""Idefics3 / SmolVLM Hugging Face checkpoints <-> NNX parameters.

The key table holds the vision tower's and connector's tensors
(`model.vision_model.*`, `model.connector.modality_projection.proj.weight`)
and the decoder's, which are hf.py's text table with `model.` read as
`model.text_model.` (lm_head.weight stays). Each Entry transforms both
ways, as in hf.py:
  patch_embedding.weight  [E, C, P, P] -> [C*P*P, E]
  {q,k,v}_proj.weight     [A*H, E]     -> [E, A, H]; biases [A*H] -> [A, H]
  out_proj.weight         [E, A*H]     -> [A, H, E]
  fc1 / fc2 / proj        [out, in]    -> [in, out]

  model = load_model(path)         # config.json model_type idefics3/smolvlm
  save_model(model, out_dir)       # transformers loads it back
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import jax.numpy as jnp
from flax import nnx

from purld_jax.models import hf
from purld_jax.models import idefics3
from purld_jax.models import lora
from purld_jax.models import siglip

Entry = hf.Entry


def _same(x):
  return x


def vision_table(cfg: siglip.VisionConfig,
                 hf_prefix: str = "model.vision_model.",
                 path: tuple = ("vision",)) -> list[Entry]:
  """The vision tower's tensors, in HF order."""
  e, a, h, c, p = (cfg.hidden_size, cfg.num_heads, cfg.head_dim,
                   cfg.num_channels, cfg.patch_size)
  same = (_same, _same)
  tr = (lambda w: w.T, lambda w: w.T)
  heads_in = (lambda w: w.T.reshape(e, a, h), lambda w: w.reshape(e, a * h).T)
  bias_in = (lambda b: b.reshape(a, h), lambda b: b.reshape(a * h))
  out_in = (lambda w: w.T.reshape(a, h, e), lambda w: w.reshape(a * h, e).T)
  patch_in = (lambda w: w.reshape(e, c * p * p).T,
              lambda w: w.T.reshape(e, c, p, p))

  emb = hf_prefix + "embeddings."
  t = [Entry(emb + "patch_embedding.weight", path + ("patch_embed",),
             *patch_in),
       Entry(emb + "patch_embedding.bias", path + ("patch_bias",), *same),
       Entry(emb + "position_embedding.weight", path + ("position_embed",),
             *same)]
  for i in range(cfg.num_layers):
    q = f"{hf_prefix}encoder.layers.{i}."
    lp = path + ("layers", i)
    for n in ("q", "k", "v"):
      t += [Entry(q + f"self_attn.{n}_proj.weight",
                  lp + ("attn", f"{n}_proj"), *heads_in),
            Entry(q + f"self_attn.{n}_proj.bias",
                  lp + ("attn", f"{n}_bias"), *bias_in)]
    t += [Entry(q + "self_attn.out_proj.weight", lp + ("attn", "o_proj"),
                *out_in),
          Entry(q + "self_attn.out_proj.bias", lp + ("attn", "o_bias"), *same)]
    for n in ("1", "2"):
      t += [Entry(q + f"layer_norm{n}.weight", lp + (f"norm{n}", "scale"),
                  *same),
            Entry(q + f"layer_norm{n}.bias", lp + (f"norm{n}", "bias"),
                  *same)]
      t += [Entry(q + f"mlp.fc{n}.weight", lp + ("mlp", f"fc{n}"), *tr),
            Entry(q + f"mlp.fc{n}.bias", lp + ("mlp", f"fc{n}_bias"), *same)]
  t += [Entry(hf_prefix + "post_layernorm.weight",
              path + ("post_norm", "scale"), *same),
        Entry(hf_prefix + "post_layernorm.bias",
              path + ("post_norm", "bias"), *same)]
  return t


def key_table(cfg: idefics3.Idefics3Config) -> list[Entry]:
  """Every tensor of an Idefics3ForConditionalGeneration checkpoint."""
  t = vision_table(cfg.vision)
  t.append(Entry("model.connector.modality_projection.proj.weight",
                 ("connector",), lambda w: w.T, lambda w: w.T))
  return t + hf.text_table(cfg.text, "model.text_model.")


def read_config(path: str | os.PathLike, **dtypes) -> idefics3.Idefics3Config:
  """Idefics3Config from `path/config.json` (errors name file and field)."""
  raw, f = hf.read_json(path)
  return idefics3.Idefics3Config.from_hf(raw, source=str(f), **dtypes)


def abstract_model(cfg: idefics3.Idefics3Config):
  """(graphdef, pure-dict param shapes) of `Idefics3(cfg)`, no weights."""
  return hf.abstract_shapes(lambda rngs: idefics3.Idefics3(cfg, rngs=rngs))


def load_params(path: str | os.PathLike, cfg: idefics3.Idefics3Config, *,
                shardings=None) -> dict:
  """The pure-dict params of `Idefics3(cfg)` from a Hugging Face directory
  (cfg without adapters; its dtypes decide the arrays')."""
  base = dataclasses.replace(cfg, text=lora.base_config(cfg.text))
  _, shapes = abstract_model(base)
  return hf.load_table(path, key_table(base), shapes, cfg.text.param_dtype,
                       shardings=shardings)


def load_model(path: str | os.PathLike, *, dtype=jnp.float32,
               param_dtype=None, shardings=None) -> idefics3.Idefics3:
  """An `Idefics3` with the weights of a Hugging Face directory.

  Raises:
    hf_config.ConfigError / hf.CheckpointError naming the file and the
    field or tensor.
  """
  cfg = read_config(path, dtype=dtype, param_dtype=param_dtype or dtype)
  base = dataclasses.replace(cfg, text=lora.base_config(cfg.text))
  graphdef, shapes = abstract_model(base)
  params = hf.load_table(path, key_table(base), shapes, cfg.text.param_dtype,
                         shardings=shardings)
  return nnx.merge(graphdef, params)


def save_model(model: idefics3.Idefics3, path: str | os.PathLike, *,
               dtype=None, extra_config: dict | None = None,
               max_shard_bytes: int | None = None) -> None:
  """Writes config.json and safetensors transformers loads as
  `Idefics3ForConditionalGeneration` (or SmolVLM's); LoRA adapters of the
  decoder are folded into its weights."""
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
