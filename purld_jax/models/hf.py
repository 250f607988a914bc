"""Hugging Face checkpoint directories <-> NNX parameters.

One key table maps every HF tensor name to an NNX path with an explicit
transform both ways. HF stores linear weights as [out, in]; we store
[in, out] with heads split out, e.g. q_proj.weight [N*H, D] -> [D, N, H].

Files read: config.json, model.safetensors or the shards named by
model.safetensors.index.json. Nothing is downloaded and nothing pickled is
ever loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from purld_jax.models import hf_config
from purld_jax.models import llama
from purld_jax.models import lora

SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A missing, mis-shaped or unreadable tensor or file."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF tensor: its name, NNX path, and the transforms both ways."""

  hf_name: str
  path: tuple[str | int, ...]
  to_nnx: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _ident(x):
  return x


def key_table(cfg: llama.LlamaConfig) -> list[Entry]:
  """Every tensor of a checkpoint of `cfg`, in HF order."""
  d, n, g, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def heads_in(num):  # [num*H, D] -> [D, num, H]
    return (lambda w: w.T.reshape(d, num, h),
            lambda w: w.reshape(d, num * h).T)

  def bias_in(num):  # [num*H] -> [num, H]
    return (lambda b: b.reshape(num, h), lambda b: b.reshape(num * h))

  o_in = (lambda w: w.T.reshape(n, h, d), lambda w: w.reshape(n * h, d).T)
  tr = (lambda w: w.T, lambda w: w.T)
  same = (_ident, _ident)

  t = [Entry("model.embed_tokens.weight", ("embed",), *same)]
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    a = ("layers", i, "attn")
    m = ("layers", i, "mlp")
    t += [
        Entry(p + "input_layernorm.weight", ("layers", i, "input_norm",
                                              "scale"), *same),
        Entry(p + "self_attn.q_proj.weight", a + ("q_proj",), *heads_in(n)),
        Entry(p + "self_attn.k_proj.weight", a + ("k_proj",), *heads_in(g)),
        Entry(p + "self_attn.v_proj.weight", a + ("v_proj",), *heads_in(g)),
        Entry(p + "self_attn.o_proj.weight", a + ("o_proj",), *o_in),
    ]
    if cfg.qkv_bias:
      t += [
          Entry(p + "self_attn.q_proj.bias", a + ("q_bias",), *bias_in(n)),
          Entry(p + "self_attn.k_proj.bias", a + ("k_bias",), *bias_in(g)),
          Entry(p + "self_attn.v_proj.bias", a + ("v_bias",), *bias_in(g)),
      ]
    if cfg.o_bias:
      t.append(Entry(p + "self_attn.o_proj.bias", a + ("o_bias",), *same))
    if cfg.qk_norm:
      t += [
          Entry(p + "self_attn.q_norm.weight", a + ("q_norm", "scale"), *same),
          Entry(p + "self_attn.k_norm.weight", a + ("k_norm", "scale"), *same),
      ]
    t += [
        Entry(p + "post_attention_layernorm.weight",
              ("layers", i, "post_attn_norm", "scale"), *same),
        Entry(p + "mlp.gate_proj.weight", m + ("gate_proj",), *tr),
        Entry(p + "mlp.up_proj.weight", m + ("up_proj",), *tr),
        Entry(p + "mlp.down_proj.weight", m + ("down_proj",), *tr),
    ]
    if cfg.mlp_bias:
      t += [Entry(p + f"mlp.{k}_proj.bias", m + (f"{k}_bias",), *same)
            for k in ("gate", "up", "down")]
  t.append(Entry("model.norm.weight", ("final_norm", "scale"), *same))
  if not cfg.tie_word_embeddings:
    t.append(Entry("lm_head.weight", ("lm_head",), *tr))
  return t


# ----------------------------------------------------------------------------
# Reading


def text_table(text_cfg: llama.LlamaConfig, prefix: str) -> list[Entry]:
  """A vision-language checkpoint's decoder tensors: `key_table` of the
  text config (adapters left out) with "model." renamed to `prefix`, the
  params under ("text",)."""
  out = []
  for e in key_table(lora.base_config(text_cfg)):
    name = e.hf_name
    if name.startswith("model."):
      name = prefix + name[len("model."):]
    out.append(Entry(name, ("text",) + e.path, e.to_nnx, e.to_hf))
  return out


def abstract_shapes(make: Callable[[nnx.Rngs], nnx.Module]):
  """(graphdef, pure-dict param shapes) of the module `make(rngs)` builds,
  without allocating weights."""
  abstract = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  return graphdef, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
      nnx.to_pure_dict(state))


def read_json(path: str | os.PathLike) -> tuple[dict, pathlib.Path]:
  """(the parsed `path/config.json`, its path); errors name the file."""
  f = pathlib.Path(path) / "config.json"
  if not f.is_file():
    raise CheckpointError(f"{f}: not found (is {path} a Hugging Face model "
                          "directory?)")
  try:
    return json.loads(f.read_text()), f
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{f}: invalid JSON at line {e.lineno}: {e.msg}"
                          ) from None


def read_config(path: str | os.PathLike, **dtypes) -> llama.LlamaConfig:
  """LlamaConfig from `path/config.json` (errors name the file and field)."""
  hf, f = read_json(path)
  return llama.LlamaConfig.from_hf(hf, source=str(f), **dtypes)


def _tensor_files(path: pathlib.Path) -> dict[str, pathlib.Path]:
  """HF tensor name -> the safetensors file holding it."""
  index = path / INDEX
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index}: malformed index ({e!r})") from None
    return {k: path / v for k, v in weight_map.items()}
  single = path / SAFETENSORS
  if not single.is_file():
    raise CheckpointError(
        f"{path}: neither {SAFETENSORS} nor {INDEX} found (only safetensors "
        "checkpoints are read; .bin pickles are never loaded)")
  return {k: single for k in _keys_of(single)}


def tensor_names(path: str | os.PathLike) -> set[str]:
  """Every tensor name of a checkpoint directory (headers only)."""
  return set(_tensor_files(pathlib.Path(path)))


def check_files(path: str | os.PathLike, read=None) -> None:
  """Raises CheckpointError (naming the file) unless `path`'s config.json
  parses and every safetensors file's header reads and fits the file
  (a torn download is caught here, before a run builds anything); a
  directory with no weights file at all passes (its config is checked).
  `read(path)` parses the config (default `read_config`: a text model;
  `idefics3_hf.read_config` for a vision-language one)."""
  (read or read_config)(path)
  if not any((pathlib.Path(path) / n).is_file() for n in (SAFETENSORS, INDEX)):
    return  # a config-only directory (AOT planning): weights come later
  files = _tensor_files(pathlib.Path(path))
  if (pathlib.Path(path) / INDEX).is_file():  # shards: each header read
    for f in sorted(set(files.values())):
      if not f.is_file():
        raise CheckpointError(f"{f}: missing (named by {INDEX})")
      _keys_of(f)


def weights_digest(path: str | os.PathLike) -> str:
  """Hex sha256 over a checkpoint directory's config.json and weight files
  (names and bytes, sorted by name): a model whose weights changed is a new
  key for what is derived from it (evaluations, exports)."""
  path = pathlib.Path(path)
  digest = hashlib.sha256()
  for f in sorted(set(_tensor_files(path).values()) | {path / "config.json"}):
    digest.update(f.name.encode() + b"\0")
    with open(f, "rb") as fh:
      for chunk in iter(lambda: fh.read(1 << 20), b""):
        digest.update(chunk)
  return digest.hexdigest()


def _keys_of(file: pathlib.Path) -> list[str]:
  from safetensors import safe_open
  try:
    with safe_open(str(file), framework="numpy") as f:
      return list(f.keys())
  except Exception as e:  # safetensors raises its own SafetensorError
    raise CheckpointError(f"{file}: unreadable safetensors file ({e})"
                          ) from None


def _read_tensors(files: dict[str, pathlib.Path], names: list[str]
                  ) -> dict[str, np.ndarray]:
  """Loads `names`, opening each file once. bf16 comes back as ml_dtypes."""
  from safetensors import safe_open
  by_file: dict[pathlib.Path, list[str]] = {}
  for name in names:
    by_file.setdefault(files[name], []).append(name)
  out = {}
  for file, keys in by_file.items():
    if not file.is_file():
      raise CheckpointError(f"{file}: listed in {INDEX} but not found")
    try:
      with safe_open(str(file), framework="flax") as f:
        for k in keys:
          out[k] = np.asarray(f.get_tensor(k))
    except CheckpointError:
      raise
    except Exception as e:
      raise CheckpointError(f"{file}: unreadable safetensors file ({e})"
                            ) from None
  return out


def _set_path(tree: dict, path: tuple, value) -> None:
  for p in path[:-1]:
    tree = tree[p]
  tree[path[-1]] = value


def load_params(path: str | os.PathLike, cfg: llama.LlamaConfig,
                *, shardings=None) -> dict:
  """Reads a checkpoint into the pure-dict param tree of `Llama(cfg)`.

  `nnx.merge(llama.abstract_model(cfg)[0], params)` makes the model.

  Args:
    path: a Hugging Face model directory.
    cfg: its config (see `read_config`); LoRA adapters (`cfg.lora`) are not
      in a checkpoint: the tree is the base model's (`lora.base_config`).
    shardings: optional pytree of `jax.sharding.Sharding` matching the tree;
      the arrays are placed there.

  Raises:
    CheckpointError naming the file and tensor that is missing or
    mis-shaped.
  """
  cfg = lora.base_config(cfg)
  return load_table(path, key_table(cfg), llama.abstract_model(cfg)[1],
                    cfg.param_dtype, shardings=shardings)


def load_table(path: str | os.PathLike, table: list[Entry], shapes: dict,
               param_dtype, *, shardings=None) -> dict:
  """Reads the tensors of `table` into a pure-dict tree shaped like
  `shapes` (`jax.ShapeDtypeStruct` leaves), checking each tensor's shape;
  errors name the file and tensor (see `load_params`)."""
  path = pathlib.Path(path)
  files = _tensor_files(path)
  missing = [e.hf_name for e in table if e.hf_name not in files]
  if missing:
    where = INDEX if (path / INDEX).is_file() else SAFETENSORS
    raise CheckpointError(
        f"{path / where}: missing tensor {missing[0]!r}"
        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  raw = _read_tensors(files, [e.hf_name for e in table])
  params = jax.tree.map(lambda x: None, shapes)
  for e in table:
    expected = _get_path(shapes, e.path)
    want = e.to_hf(np.zeros(expected.shape, np.float32)).shape
    got = raw[e.hf_name].shape
    if tuple(got) != tuple(want):
      raise CheckpointError(
          f"{files[e.hf_name]}: tensor {e.hf_name!r} has shape {tuple(got)}, "
          f"expected {tuple(want)} for this config.json")
    arr = e.to_nnx(raw.pop(e.hf_name))
    _set_path(params, e.path, jnp.asarray(arr, dtype=param_dtype))
  if shardings is not None:
    params = jax.device_put(params, shardings)
  return params


def _get_path(tree, path):
  for p in path:
    tree = tree[p]
  return tree


# ----------------------------------------------------------------------------
# Writing


def to_hf_tensors(params: dict, cfg: llama.LlamaConfig, *, dtype=None
                  ) -> dict[str, np.ndarray]:
  """HF tensor name -> numpy array in HF layout ([out, in]), in HF order.

  Args:
    params: the pure-dict param tree of `Llama(cfg)` (`load_params`).
    cfg: its config.
    dtype: dtype of the arrays (default: as stored).
  """
  return table_tensors(params, key_table(cfg), dtype=dtype)


def table_tensors(params: dict, table: list[Entry], *, dtype=None
                  ) -> dict[str, np.ndarray]:
  """HF tensor name -> array in HF layout of every entry of `table`."""
  tensors = {}
  for e in table:
    arr = np.asarray(jax.device_get(_get_path(params, e.path)))
    if dtype is not None:
      arr = arr.astype(dtype)
    tensors[e.hf_name] = np.ascontiguousarray(e.to_hf(arr))
  return tensors


def save_params(model: llama.Llama, path: str | os.PathLike, *,
                dtype=None, extra_config: dict | None = None,
                max_shard_bytes: int | None = None) -> None:
  """Writes config.json and safetensors (sharded above `max_shard_bytes`).

  Args:
    model: the model to write; LoRA adapters are folded into their
      weights (`lora.fold`): the directory holds the merged base model.
    path: output directory (created).
    dtype: dtype of the written tensors (default: the param dtype).
    extra_config: keys to keep in config.json (bos/eos ids and the like).
    max_shard_bytes: split into `model-0000i-of-0000n.safetensors` files
      plus an index when the total is larger.
  """
  params = lora.fold(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.cfg)
  cfg = lora.base_config(model.cfg)
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  tensors = to_hf_tensors(params, cfg, dtype=dtype)
  dtype_name = str(next(iter(tensors.values())).dtype)
  cfg_json = hf_config.to_hf(cfg, torch_dtype=dtype_name, extra=extra_config)
  write_checkpoint(path, cfg_json, tensors, max_shard_bytes=max_shard_bytes)


def write_checkpoint(path: pathlib.Path, cfg_json: dict,
                     tensors: dict[str, np.ndarray], *,
                     max_shard_bytes: int | None = None) -> None:
  """Writes config.json and the tensors (sharded above `max_shard_bytes`,
  with an index) into the existing directory `path`."""
  from safetensors.numpy import save_file
  (path / "config.json").write_text(json.dumps(cfg_json, indent=2) + "\n")
  total = sum(a.nbytes for a in tensors.values())
  if max_shard_bytes is None or total <= max_shard_bytes:
    save_file(tensors, str(path / SAFETENSORS), metadata={"format": "pt"})
    return
  shards, cur, size = [], {}, 0
  for k, a in tensors.items():
    if cur and size + a.nbytes > max_shard_bytes:
      shards.append(cur)
      cur, size = {}, 0
    cur[k] = a
    size += a.nbytes
  shards.append(cur)
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, str(path / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in shard})
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
