"""The student as a trainer needs it: (graphdef, params, tokenizer) from `model.*`.

  model.path = "embedded"  SmolLM2-135M-Instruct, converted once (embedded.py)
  model.path = "tiny"      a random `llama.tiny_config()` model and the
                           character-level chat tokenizer below (CPU tests)
  model.path = DIR         a Hugging Face directory (read only); one whose
                           config.json model_type is idefics3 / smolvlm or
                           qwen2_5_vl is a vision-language student
                           (`Student.processor`: prompts with images,
                           vision.py, vision_qwen.py)

`Student` knows the architecture and the tokenizer without reading weights,
so a resumed run restores into `abstract()` and never loads them. Params are
NNX's pure-dict layout (nested dicts of arrays): what the optimizer, the
checkpoints and `nnx.merge(graphdef, params)` take.

With `model.lora.rank` > 0 the architecture carries LoRA adapters
(models/lora.py) and a stage trains only them (`trainable`): the base is
frozen, loaded from its source on every start (resumes included).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from purld_jax.models import embedded
from purld_jax.models import hf
from purld_jax.models import idefics3
from purld_jax.models import llama
from purld_jax.models import lora
from purld_jax.models import qwen2_vl
from purld_jax.models import tokenizer as tokenizer_lib

TINY = "tiny"
EMBEDDED = "embedded"
CHAR_SPECIALS = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>")
# Printable ASCII and newline: 96 characters, 100 ids with the specials.
CHAR_ALPHABET = tuple(chr(c) for c in range(32, 127)) + ("\n",)
# ChatML without a default system turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype(name: str):
  """jnp dtype of a config dtype name (float32 | bfloat16)."""
  if name not in _DTYPES:
    raise ValueError(f"dtype {name!r} not in {sorted(_DTYPES)}")
  return _DTYPES[name]


def write_char_tokenizer(path: str | os.PathLike, *,
                         specials: tuple[str, ...] = CHAR_SPECIALS,
                         eos: str = "<|im_end|>",
                         chat_template: str = CHAT_TEMPLATE):
  """Saves a character-level tokenizer as an HF directory; returns it.

  The default is ChatML in 100 ids. Ids: `specials` (pad, unk, then the
  added special tokens), then `CHAR_ALPHABET`; `eos` is one of them.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  vocab = {t: i for i, t in enumerate(tuple(specials) + CHAR_ALPHABET)}
  core = tokenizers.Tokenizer(
      tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  core.pre_tokenizer = tokenizers.pre_tokenizers.Split(
      tokenizers.Regex("(?m)."), behavior="isolated")
  core.decoder = tokenizers.decoders.Fuse()
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
      eos_token=eos, additional_special_tokens=list(specials[2:]))
  hf.chat_template = chat_template
  hf.save_pretrained(str(path))
  return hf


def char_tokenizer(path: str | os.PathLike) -> tokenizer_lib.Tokenizer:
  """The character tokenizer, written to `path` on first use, then loaded."""
  path = pathlib.Path(path)
  if not (path / "tokenizer.json").is_file():
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    write_char_tokenizer(tmp)
    if path.exists():  # a half-written one from a killed run
      shutil.rmtree(path)
    os.replace(tmp, path)
  return tokenizer_lib.load(path)


@dataclasses.dataclass(frozen=True)
class Student:
  """What a trainer needs to know about the model before touching weights.

  Attributes:
    cfg: the architecture: a `llama.LlamaConfig`, or for a vision-language
      student an `idefics3.Idefics3Config` or `qwen2_vl.Qwen2VLConfig`
      (no LoRA).
    hf_dir: the Hugging Face directory the weights come from (None: random
      init of the tiny model from `init_seed`).
    init_seed: seed of the random init (`_random_params`).
    tokenizer: the tokenizer.
    processor: a vision-language student's `Idefics3Processor` or
      Qwen2.5-VL processor (images of prompts -> image tokens and pixels,
      vision.py); None for text.
  """

  cfg: llama.LlamaConfig | idefics3.Idefics3Config | qwen2_vl.Qwen2VLConfig
  hf_dir: str | None
  init_seed: int
  tokenizer: tokenizer_lib.Tokenizer
  processor: Any = dataclasses.field(default=None, compare=False)

  @property
  def is_vlm(self) -> bool:
    return isinstance(self.cfg, _VLM_CONFIGS)

  def abstract(self):
    """(graphdef, params as jax.ShapeDtypeStruct): no weights are read.
    With LoRA, the adapted model's (adapters and base)."""
    if self.is_vlm:
      return vlm_hf(self.cfg).abstract_model(self.cfg)
    return llama.abstract_model(self.cfg)

  def base_graphdef(self):
    """The graphdef of the model without adapters (`init_params`' tree)."""
    if self.is_vlm:
      return self.abstract()[0]
    return llama.abstract_model(lora.base_config(self.cfg))[0]

  def base(self) -> "Student":
    """This student without adapters (what an HF directory holds)."""
    if self.is_vlm:
      return self
    return dataclasses.replace(self, cfg=lora.base_config(self.cfg))

  def init_params(self) -> dict:
    """The initial base params (pure dict, no adapters): from hf_dir, or
    the random init."""
    if self.hf_dir is None:
      return _random_params(lora.base_config(self.cfg), self.init_seed)
    return self.load_params(self.hf_dir)

  def load_params(self, path: str) -> dict:
    """The base params of this architecture from the HF directory `path`
    (the student's own, or a stage's output)."""
    if self.is_vlm:
      return vlm_hf(self.cfg).load_params(path, self.cfg)
    return hf.load_params(path, self.cfg)


_VLM_CONFIGS = (idefics3.Idefics3Config, qwen2_vl.Qwen2VLConfig)


def vlm_hf(cfg):
  """The checkpoint module (idefics3_hf / qwen2_vl_hf) of a
  vision-language config."""
  if isinstance(cfg, qwen2_vl.Qwen2VLConfig):
    from purld_jax.models import qwen2_vl_hf  # pylint: disable=g-import-not-at-top
    return qwen2_vl_hf
  from purld_jax.models import idefics3_hf  # pylint: disable=g-import-not-at-top
  return idefics3_hf


@dataclasses.dataclass(frozen=True)
class Trainable:
  """What a stage trains (`loop.Stage`'s param arguments).

  Attributes:
    shapes: the trained tree's jax.ShapeDtypeStruct (pure dict).
    shardings: its NamedShardings.
    init: () -> its initial host values (run only without a checkpoint).
    frozen: None, or with LoRA the base params on `frozen_sh` (device).
    frozen_sh: None, or the base's NamedShardings.
  """

  shapes: Any
  shardings: Any
  init: Callable[[], Any]
  frozen: Any = None
  frozen_sh: Any = None

  def full(self, params):
    """The whole model's params: `params` with the frozen base joined in."""
    return params if self.frozen is None else lora.join(params, self.frozen)


def trainable(student: Student, param_sh, base_init: Callable[[], dict], *,
              seed: int = 0) -> Trainable:
  """The whole model initialised by `base_init()`; with LoRA the adapters
  (`lora.init_adapters(cfg, seed)`: B = 0, so the start is the base) over
  `base_init()` put on its shardings, frozen (read now, resume or not).

  Args:
    student: the student (its cfg says whether LoRA is on).
    param_sh: `sharding.param_shardings(student.cfg, mesh)` (full tree).
    base_init: () -> base params on the host (pure dict, no adapters).
    seed: the adapters' init seed.
  """
  from purld_jax import sharded  # pylint: disable=g-import-not-at-top
  _, shapes = student.abstract()
  if student.cfg.lora is None:
    return Trainable(shapes, param_sh, base_init)
  ad_shapes, _ = lora.split(shapes)
  ad_sh, base_sh = lora.split(param_sh)
  frozen = sharded.put(jax.tree.map(np.asarray, base_init()), base_sh)
  return Trainable(ad_shapes, ad_sh,
                   lambda: lora.init_adapters(student.cfg, seed),
                   frozen=frozen, frozen_sh=base_sh)


def _random_params(cfg: llama.LlamaConfig, seed: int) -> dict:
  """A seeded random init on the host (numpy): matrices ~ N(0, 0.02^2) like
  `layers.param`, norm scales 1, biases 0. Host-side because compiling
  JAX's initialisers costs more than the whole tiny run on a CPU."""
  rng = np.random.default_rng(seed)
  _, shapes = llama.abstract_model(cfg)

  def init(path, s):
    name = getattr(path[-1], "key", None)
    if len(s.shape) >= 2:
      value = 0.02 * rng.standard_normal(s.shape, dtype=np.float32)
    else:
      value = np.full(s.shape, 1.0 if name == "scale" else 0.0, np.float32)
    return jnp.asarray(value, s.dtype)
  return jax.tree_util.tree_map_with_path(init, shapes)


def resolve_path(path: str, cache_dir: str = "") -> str:
  """The HF directory a model path names ("tiny" stays "tiny")."""
  if path == TINY:
    return path
  if path == EMBEDDED:
    return str(embedded.ensure_converted(cache_dir or None))
  return path


def architecture(*, path: str, dtype_name: str, param_dtype_name: str,
                 cache_dir: str = "", remat: str = "none",
                 scan_layers: bool = False,
                 lora_spec: lora.LoraSpec | None = None):
  """The LlamaConfig of `model.*` alone: only `config.json` is read, so a
  directory holding nothing else (configs/arch/) is enough for abstract
  shapes, AOT compiles and memory estimates. A directory of model_type
  idefics3 / smolvlm gives an `idefics3.Idefics3Config`, qwen2_5_vl a
  `qwen2_vl.Qwen2VLConfig` (remat and scan_layers apply to the decoder;
  LoRA is refused)."""
  dt, pdt = dtype(dtype_name), dtype(param_dtype_name)
  if path == TINY:
    return llama.tiny_config(vocab_size=128, dtype=dt, param_dtype=pdt,
                             remat=remat, scan_layers=scan_layers,
                             lora=lora_spec)
  if is_vlm_dir(resolve_path(path, cache_dir)):
    if lora_spec is not None:
      raise ValueError(f"{path}: model.lora is not supported for a "
                       "vision-language student (train it whole)")
    read = vlm_reader(resolve_path(path, cache_dir))
    cfg = read(resolve_path(path, cache_dir), dtype=dt, param_dtype=pdt)
    return dataclasses.replace(cfg, text=cfg.text.replace(
        remat=remat, scan_layers=scan_layers))
  return hf.read_config(resolve_path(path, cache_dir), dtype=dt,
                        param_dtype=pdt).replace(remat=remat,
                                                 scan_layers=scan_layers,
                                                 lora=lora_spec)


def is_vlm_dir(path: str) -> bool:
  """True when `path/config.json` names a vision-language model_type
  (idefics3 / smolvlm, qwen2_5_vl)."""
  return vlm_reader(path) is not None


def vlm_reader(path: str):
  """`read_config` of the checkpoint module for `path/config.json`'s
  vision-language model_type; None for a text model (or no readable
  config.json: the text loader names the problem)."""
  if path in (TINY, EMBEDDED):
    return None
  try:
    raw, _ = hf.read_json(path)
  except Exception:  # pylint: disable=broad-except
    return None
  kind = raw.get("model_type")
  if kind in idefics3.SUPPORTED:
    from purld_jax.models import idefics3_hf  # pylint: disable=g-import-not-at-top
    return idefics3_hf.read_config
  if kind in qwen2_vl.SUPPORTED:
    from purld_jax.models import qwen2_vl_hf  # pylint: disable=g-import-not-at-top
    return qwen2_vl_hf.read_config
  return None


def config_architecture(model_cfg) -> llama.LlamaConfig:
  """`architecture` of the config's `model` block, `model.lora` included
  (tools/aot.py and tools/memory.py size the adapters' training)."""
  return architecture(path=model_cfg.path, dtype_name=model_cfg.dtype,
                      param_dtype_name=model_cfg.param_dtype,
                      cache_dir=model_cfg.cache_dir,
                      remat=model_cfg.get("remat", "none"),
                      scan_layers=model_cfg.get("scan_layers", False),
                      lora_spec=lora.spec_from_config(model_cfg.get("lora")))


def make(*, path: str, dtype_name: str, param_dtype_name: str, init_seed: int,
         cache_dir: str, workdir: str, remat: str = "none",
         scan_layers: bool = False,
         lora_spec: lora.LoraSpec | None = None) -> Student:
  """The student of `model.*` (reads config and tokenizer, not weights).

  Args:
    path: "tiny", "embedded" or a Hugging Face directory.
    dtype_name, param_dtype_name: compute and storage dtypes.
    init_seed: the tiny model's init seed.
    cache_dir: conversion cache of "embedded" ('' = default).
    workdir: run directory; the tiny tokenizer is written under it.
    remat: `LlamaConfig.remat` (what a layer keeps for the backward pass).
    scan_layers: `LlamaConfig.scan_layers` (one scanned layer, not L).
    lora_spec: `LlamaConfig.lora` (None: no adapters).
  """
  hf_dir = None if path == TINY else resolve_path(path, cache_dir)
  cfg = architecture(path=hf_dir or TINY, dtype_name=dtype_name,
                     param_dtype_name=param_dtype_name, remat=remat,
                     scan_layers=scan_layers, lora_spec=lora_spec)
  if hf_dir is None:
    tok = char_tokenizer(pathlib.Path(workdir) / "tiny_tokenizer")
    return Student(cfg=cfg, hf_dir=None, init_seed=init_seed, tokenizer=tok)
  if isinstance(cfg, idefics3.Idefics3Config):
    from purld_jax.models import idefics3_processing  # pylint: disable=g-import-not-at-top
    return Student(cfg=cfg, hf_dir=hf_dir, init_seed=init_seed,
                   tokenizer=tokenizer_lib.load(hf_dir, content_parts=True),
                   processor=idefics3_processing.load_processor(hf_dir, cfg))
  if isinstance(cfg, qwen2_vl.Qwen2VLConfig):
    from purld_jax import vision_qwen  # pylint: disable=g-import-not-at-top
    from purld_jax.models import qwen2_vl_processing  # pylint: disable=g-import-not-at-top
    proc = qwen2_vl_processing.load_processor(hf_dir, cfg)
    try:
      vision_qwen.image_side(proc.image_processor)
    except ValueError as e:
      raise ValueError(f"{hf_dir}/{e}") from e
    return Student(cfg=cfg, hf_dir=hf_dir, init_seed=init_seed,
                   tokenizer=tokenizer_lib.load(hf_dir), processor=proc)
  return Student(cfg=cfg, hf_dir=hf_dir, init_seed=init_seed,
                 tokenizer=tokenizer_lib.load(hf_dir))


def from_config(model_cfg, workdir: str) -> Student:
  """`make` from the config's `model` block."""
  return make(path=model_cfg.path, dtype_name=model_cfg.dtype,
              param_dtype_name=model_cfg.param_dtype,
              init_seed=model_cfg.init_seed, cache_dir=model_cfg.cache_dir,
              workdir=workdir, remat=model_cfg.get("remat", "none"),
              scan_layers=model_cfg.get("scan_layers", False),
              lora_spec=lora.spec_from_config(model_cfg.get("lora")))
