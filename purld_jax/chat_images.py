"""Images in `purld_jax.chat`: a vision-language student directory
(Idefics3 / SmolVLM, Qwen2.5-VL) answers user turns that hold images.

A user turn's images ride in its message as an "images" list of PIL
images (`read_image`: the --image files, `/image PATH`). The conversation
is rendered by the chat template with one image part per image in front
of its turn's text (`vision.with_image_parts`' form, turn by turn), and
the processor writes each image as its tokens and gives its pixels
(`encode`), as for a training prompt (`vision.encode_prompt`).

Answers come from the sampler the trainers and the held-out table use
(`sampling.sample`, one candidate; greedy at temperature 0): the prompt
left-padded to a bucket, the images stacked to `vision.image_slots`
slots, one compile per (bucket, slots). An answer is written when it is
complete (no streaming).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

from purld_jax import chat_decode


def is_vlm_dir(path: str) -> bool:
  """True when `path`'s config.json names a vision-language model_type
  (idefics3, smolvlm, qwen2_5_vl)."""
  from purld_jax.models import idefics3  # pylint: disable=g-import-not-at-top
  from purld_jax.models import qwen2_vl  # pylint: disable=g-import-not-at-top
  try:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
      model_type = json.load(f).get("model_type")
  except (OSError, ValueError, AttributeError):
    return False
  return model_type in {**idefics3.SUPPORTED, **qwen2_vl.SUPPORTED}


def load(path: str, *, dtype: str = "float32"):
  """(model, tokenizer, processor) of a vision-language HF directory, as
  the trainers load a student (`train.student.make`)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from purld_jax.train import student as student_lib  # pylint: disable=g-import-not-at-top
  s = student_lib.make(path=path, dtype_name=dtype, param_dtype_name=dtype,
                       init_seed=0, cache_dir="", workdir=path)
  graphdef, _ = s.abstract()
  return nnx.merge(graphdef, s.init_params()), s.tokenizer, s.processor


def read_image(path: str):
  """The image file `path` decoded (PIL, RGB).

  Raises:
    ValueError naming the file: missing, or not an image PIL reads.
  """
  import PIL.Image  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file")
  try:
    with PIL.Image.open(path) as img:
      img.load()
      return img.convert("RGB")
  except Exception as e:  # pylint: disable=broad-except  (PIL raises several)
    raise ValueError(f"{path}: cannot be read as an image "
                     f"({type(e).__name__})") from None


def chat_dicts(messages: Sequence[dict]) -> list[dict]:
  """`messages` as chat-template dicts: each turn's "images" become image
  parts in front of its text; turns without images are as they are."""
  from purld_jax import vision  # pylint: disable=g-import-not-at-top
  out = []
  for m in messages:
    plain = {"role": m["role"], "content": m["content"]}
    out.extend(vision.with_image_parts([plain], len(m.get("images", ()))))
  return out


def encode(processor, tok, messages: Sequence[dict]):
  """(ids, pixel_values, pixel_mask) of a conversation whose user turns
  may hold images: pixel_values f32[1, I, C, Y, X] and pixel_mask
  bool[1, I, Y, X] (Qwen2.5-VL: f32[1, I, Q, K], bool[1, I]), I =
  `vision.image_slots` of the conversation's images (all of them, in
  order); (ids, None, None) without images."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from purld_jax import vision  # pylint: disable=g-import-not-at-top
  from purld_jax import vision_qwen  # pylint: disable=g-import-not-at-top
  images = [im for m in messages for im in m.get("images", ())]
  text = tok.render_chat(chat_dicts(messages))
  if not images:
    return list(tok.encode(text)), None, None
  if vision_qwen.is_qwen_processor(processor):
    ids, pv, pm = vision_qwen.encode(processor, text, images)
    return (list(ids),
            *vision_qwen.stack([(pv, pm)], vision.image_slots(len(pv))))
  out = processor(text=[text], images=[images], add_special_tokens=False,
                  return_tensors="np")
  pixels = (np.asarray(out["pixel_values"], np.float32)[0],
            np.asarray(out["pixel_attention_mask"]).astype(bool)[0])
  return ([int(i) for i in np.asarray(out["input_ids"])[0]],
          *vision.stack_images([pixels],
                               vision.tile_size(processor.image_processor)))


class VisionDecoder:
  """`chat_decode.Decoder`'s interface (`count`, `max_prompt_len`,
  `reply`) for a vision-language model: each answer is one
  `sampling.sample` call on the encoded conversation (`encode`). A
  Reply's time is all in `decode_s` (prefill_s = 0; steps = its tokens).
  """

  def __init__(self, model, tok, processor, *, max_new_tokens: int = 256,
               temperature: float = 0.0,
               buckets: Sequence[int] = chat_decode.BUCKETS, seed: int = 0,
               err=sys.stderr):
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from purld_jax import sampling  # pylint: disable=g-import-not-at-top
    from purld_jax import vision  # pylint: disable=g-import-not-at-top
    self.buckets = chat_decode.fitting_buckets(
        buckets, max_new_tokens,
        vision.decoder(model).cfg.max_position_embeddings)
    self.tok, self.processor = tok, processor
    self.sampling = sampling.SamplingParams(
        temperature=temperature, max_new_tokens=max_new_tokens,
        stop_ids=tok.stop_ids)
    self._graphdef, self._params = nnx.split(model)
    self._key = jax.random.PRNGKey(seed)
    self._replies = 0
    self._shapes: set = set()  # (bucket, pixel shape) compiled
    self._err = err

  @property
  def max_prompt_len(self) -> int:
    """The longest prompt (tokens, image tokens included) that fits."""
    return self.buckets[-1]

  def count(self, messages: Sequence[dict]) -> int:
    """Prompt length in tokens of `messages`, images written out."""
    return len(encode(self.processor, self.tok, messages)[0])

  def reply(self, messages: Sequence[dict], *, out=None
            ) -> chat_decode.Reply:
    """The assistant's answer to `messages` (written to `out` when given,
    once complete).

    Raises:
      ValueError: the prompt is longer than `max_prompt_len`.
    """
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from purld_jax import sampling  # pylint: disable=g-import-not-at-top
    from purld_jax import templates  # pylint: disable=g-import-not-at-top
    from purld_jax.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
    ids, pv, pm = encode(self.processor, self.tok, messages)
    if len(ids) > self.max_prompt_len:
      raise ValueError(f"prompt of {len(ids)} tokens > "
                       f"{self.max_prompt_len}")
    bucket = tok_lib.bucket_length(len(ids), self.buckets)
    shape = (bucket, None if pv is None else pv.shape)
    if shape not in self._shapes:
      print("[chat] compiling (first reply"
            f"{', a new prompt shape' if self._shapes else ''}) ...",
            file=self._err, flush=True)
      self._shapes.add(shape)
    tokens, mask = tok_lib.pad_left([ids], self.tok.pad_id, bucket)
    images = {} if pv is None else dict(pixel_values=jnp.asarray(pv),
                                        pixel_mask=jnp.asarray(pm))
    key = jax.random.fold_in(self._key, self._replies)
    self._replies += 1
    t0 = time.perf_counter()
    c = jax.device_get(sampling.sample(
        self._graphdef, self._params, jnp.asarray(tokens), jnp.asarray(mask),
        key, prompt_index=jnp.zeros((1,), jnp.int32), num_candidates=1,
        sampling=self.sampling, pad_id=self.tok.pad_id, **images))
    answer = templates.cut_at_stop(c.tokens[0, 0, :c.lengths[0, 0]],
                                   self.tok.stop_ids)
    text = self.tok.decode(answer)
    if out is not None:
      out.write(text + "\n")
      out.flush()
    return chat_decode.Reply(text=text, ids=answer, prefill_s=0.0,
                             decode_s=time.perf_counter() - t0,
                             steps=len(answer))
