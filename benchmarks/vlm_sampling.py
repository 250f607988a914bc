"""Image prompts through the sampler: ours runs the vision tower and the
prefill once per prompt, transformers' generate prefills once per candidate.

  python -m benchmarks.vlm_sampling                       # tiny, seconds
  python -m benchmarks.vlm_sampling --shape=smolvlm-256m  # minutes
  python -m benchmarks.vlm_sampling --ks=1,2 --repeats=1  # what the test runs

The job: B = 2 prompts of one image each, written out by the Idefics3
processor as its tiles, K candidates per prompt (K in 1, 4, 8 by default),
exactly T new tokens each (no stop ids), temperature 1, no filters. Both
sides load the same random weights from one Hugging Face directory written by
`idefics3_hf.save_model` (our random init; nothing is downloaded) and get the
same prompt ids, pixels and pixel masks (`data.encode` / `data.collate`).

- **ours**: one jitted `sampling.sample(..., pixel_values=, pixel_mask=)`.
  Its counts are taken while it is traced, as
  tests/test_vlm_sampling.py does: `Idefics3.image_features` and
  `Llama.extend` are wrapped with counters, so *vision rows* are the
  [B * I] tiles the tower is given (I: the batch's image slots, the tiles
  rounded up to 1, 2, 4 or a multiple of 4; padding slots are all-zero and go through
  the tower too, `models/idefics3.py`) and *prefill rows* the rows of the
  prompt pass. The decode steps never call either. Time: the best of
  `--repeats` calls of the compiled function (compile excluded, printed
  apart), tokens on the host.
- **peers**: transformers' `Idefics3ForConditionalGeneration.generate(...,
  num_return_sequences=K, do_sample=True, top_k=0, top_p=1,
  min_new_tokens=T, max_new_tokens=T)` in torch (test/bench-only
  dependency), in the same process after ours, OMP_WAIT_POLICY=PASSIVE.
  A forward pre-hook on `model.model.vision_model` sums the images it
  encodes (transformers drops the all-zero padding slots first), one on
  `model.model.text_model` takes the batch of its first forward (the
  prefill). Two modes:
  - `generate`: generate as it is. transformers 5.x encodes the images
    *before* it repeats the inputs K-fold (`mm_encoder_outputs`,
    `_prepare_multimodal_encoder_kwargs_for_generation`) and repeats the
    features, so its vision rows stay B x tiles; the prefill still runs on
    B * K rows (`_expand_inputs_for_generation`).
  - `generate-kfold`: that pre-encoding switched off on the instance
    (`_supports_mm_encoder_outputs` -> False), so the pixels are repeated
    K-fold with the other inputs and encoded in the first forward: B * K x
    tiles, the path of a generate without `mm_encoder_outputs`.
  Time: the best of `--repeats` calls (the first includes torch's one-time
  setup).

Shapes (`--shape`):
- `tiny` (default): `models.tiny_vlm` (SigLIP 1 layer, 28 px tiles of 7 px
  patches, scale 2, the tiny Llama), its processor set to split: images
  resized to 56 px, 2 x 2 tiles + the global view = 5 tiles per image
  (I = 8 slots); T = 8.
- `smolvlm-256m`: random weights of SmolVLM-256M's shape (SigLIP base patch
  16 at 512 px: 12 layers of 768, MLP 3072, 12 heads; scale factor 4, so 64
  tokens a tile; SmolLM2-135M text: 30 layers of 576, MLP 1536, 9 heads / 3
  KV heads, vocabulary 49280, rope theta 1e5, untied head), with the tiny
  character tokenizer (the ids are random anyway). Its processor resizes to
  512 px, one tile per image (SmolVLM's own longest_edge 2048 would give 17
  tiles an image: too slow for this CPU's peer at K = 8). T = 8. Peers:
  `generate` only unless `--peers` says otherwise.

Prints a table, one line per K, and appends one JSON line to
benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import sys
import tempfile
import time

# torch's OpenMP threads spin between ops by default; on a shared machine
# that collapses its speed (2.3 s against 0.02 s for the tiny K = 2 job
# here), so sleep as the other side-by-side benchmarks do. Read when libgomp
# loads, i.e. before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from benchmarks import peers  # noqa: E402
from benchmarks import sampling as sampling_bench  # noqa: E402

RESULTS = pathlib.Path(__file__).with_name("results.jsonl")
QUESTIONS = ("What shape is in the picture?", "Describe the colours.")
SHAPES = {
    # tile, longest edge the image is resized to, new tokens
    "tiny": dict(tile=28, longest_edge=56, new_tokens=8),
    "smolvlm-256m": dict(tile=512, longest_edge=512, new_tokens=8),
}


# ----------------------------------------------------------------------------
# The model directory and the prompts


def _smolvlm_256m_config(image_token_id: int):
  import jax.numpy as jnp
  from purld_jax.models import idefics3
  from purld_jax.models import llama
  from purld_jax.models import siglip
  vision = siglip.VisionConfig(
      hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
      image_size=512, patch_size=16, layer_norm_eps=1e-6)
  text = llama.LlamaConfig(
      vocab_size=49280, hidden_size=576, intermediate_size=1536,
      num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
      rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
      tie_word_embeddings=False, param_dtype=jnp.float32, dtype=jnp.float32)
  return idefics3.Idefics3Config(vision=vision, text=text, scale_factor=4,
                                 image_token_id=image_token_id)


def build_model_dir(shape: str, path: str, seed: int = 0) -> str:
  """A random Idefics3 HF directory of `shape` at `path` (our init, saved by
  `idefics3_hf.save_model`), its preprocessor_config.json as `SHAPES`."""
  from purld_jax.models import idefics3_processing as proc_lib
  from purld_jax.models import tiny_vlm
  s = SHAPES[shape]
  if shape == "tiny":
    tiny_vlm.make_vlm_dir(path, seed=seed)
  else:
    from flax import nnx
    from purld_jax.models import idefics3
    from purld_jax.models import idefics3_hf
    tok = tiny_vlm.write_tokenizer(path)
    cfg = _smolvlm_256m_config(tok.convert_tokens_to_ids("<image>"))
    model = idefics3.Idefics3(cfg, rngs=nnx.Rngs(seed))
    idefics3_hf.save_model(model, path)
    del model
  proc_lib.image_processor(
      max_image_size=s["tile"], longest_edge=s["longest_edge"],
      do_image_splitting=True).save_pretrained(str(path))
  return path


def png(seed: int, h: int = 20, w: int = 24) -> bytes:
  """Encoded PNG bytes of a small random RGB image."""
  import PIL.Image
  rng = np.random.default_rng(seed)
  img = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def prompt_batch(student, b: int):
  """The collated batch of B one-image prompts (the pipeline's own path)."""
  from purld_jax import data as data_lib
  from purld_jax import prompts as prompts_lib
  prompts = [prompts_lib.Prompt(
      id=f"p{i}", messages=(("user", QUESTIONS[i % len(QUESTIONS)]),),
      images=(png(i),)) for i in range(b)]
  source = data_lib.encode(prompts, student.tokenizer, max_len=1 << 14,
                           processor=student.processor)
  assert len(source.ids) == b, "a prompt was dropped"
  return data_lib.collate(source, list(range(b)), buckets=None)


def tiles_per_image(batch) -> list[int]:
  """Real (not all-zero) tiles of each prompt's image."""
  pv = batch.pixel_values
  return [int((np.abs(pv[r]).reshape(pv.shape[1], -1).max(-1) > 0).sum())
          for r in range(pv.shape[0])]


# ----------------------------------------------------------------------------
# Ours


@contextlib.contextmanager
def counting_ours(calls: dict):
  """Wraps `Idefics3.image_features` and `Llama.extend` with counters (they
  run while a function is traced)."""
  from purld_jax.models import idefics3
  from purld_jax.models import llama
  real_vision = idefics3.Idefics3.image_features
  real_extend = llama.Llama.extend

  def vision_spy(self, pv, pm=None):
    calls["vision"].append(tuple(pv.shape))
    return real_vision(self, pv, pm)

  def extend_spy(self, tokens, cache, **kw):
    rows = (kw["embeds"].shape[:2] if kw.get("embeds") is not None
            else tokens.shape)
    calls["extend"].append(tuple(int(r) for r in rows))
    return real_extend(self, tokens, cache, **kw)

  idefics3.Idefics3.image_features = vision_spy
  llama.Llama.extend = extend_spy
  try:
    yield calls
  finally:
    idefics3.Idefics3.image_features = real_vision
    llama.Llama.extend = real_extend


def run_ours(graphdef, params, batch, k: int, t: int, pad_id: int,
             repeats: int) -> dict:
  """Counts (at trace time), compile seconds and the best call's seconds."""
  import jax
  import jax.numpy as jnp
  from purld_jax import sampling
  sp = sampling.SamplingParams(temperature=1.0, max_new_tokens=t,
                               stop_ids=())
  # a fresh jit, so the counters see a trace of their own
  fn = jax.jit(sampling.sample.__wrapped__, static_argnames=(
      "graphdef", "num_candidates", "sampling", "pad_id"))
  args = (params, jnp.asarray(batch.tokens), jnp.asarray(batch.mask),
          jax.random.key(0))
  kwargs = dict(prompt_index=jnp.asarray(batch.index),
                pixel_values=jnp.asarray(batch.pixel_values),
                pixel_mask=jnp.asarray(batch.pixel_mask))
  calls = {"vision": [], "extend": []}
  start = time.perf_counter()
  with counting_ours(calls):
    lowered = fn.lower(graphdef, *args, num_candidates=k, sampling=sp,
                       pad_id=pad_id, **kwargs)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = compiled(*args, **kwargs)
    tokens = np.asarray(out.tokens)
    runs.append(time.perf_counter() - start)
  assert tokens.shape == (batch.tokens.shape[0], k, t), tokens.shape
  return dict(vision_calls=calls["vision"], prefill_calls=calls["extend"],
              vision_rows=sum(s[0] * s[1] for s in calls["vision"]),
              prefill_rows=sum(s[0] for s in calls["extend"]),
              compile_s=compile_s, runs_s=runs, s=min(runs))


# ----------------------------------------------------------------------------
# Peer: transformers' generate


def load_peer(path: str):
  import torch
  import transformers
  model = transformers.Idefics3ForConditionalGeneration.from_pretrained(
      path, dtype=torch.float32)
  model.eval()
  return model


PEERS = ("generate", "generate-kfold")


def run_peer(model, batch, k: int, t: int, pad_id: int, repeats: int,
             mode: str = "generate") -> dict:
  """Counts by forward hooks (first run) and the best run's seconds.

  mode "generate": transformers' generate as it is (it encodes the images
  once, before it repeats the inputs K-fold: `mm_encoder_outputs`);
  "generate-kfold": that pre-encoding switched off on this instance, so the
  pixels are repeated K-fold with the other inputs and encoded in the first
  forward, as generate did before `mm_encoder_outputs` existed.
  """
  import torch
  if mode not in PEERS:
    raise ValueError(f"peer mode {mode!r}: one of {PEERS}")
  if mode == "generate-kfold":
    model._supports_mm_encoder_outputs = lambda: False  # pylint: disable=protected-access
  else:
    model.__dict__.pop("_supports_mm_encoder_outputs", None)
  calls = {"vision": [], "text": []}

  def vision_hook(module, args, kwargs):
    pv = kwargs.get("pixel_values", args[0] if args else None)
    calls["vision"].append(tuple(pv.shape))

  def text_hook(module, args, kwargs):
    x = kwargs.get("inputs_embeds")
    if x is None:
      x = kwargs.get("input_ids", args[0] if args else None)
    calls["text"].append(tuple(x.shape[:2]))

  inner = model.model
  hooks = [inner.vision_model.register_forward_pre_hook(vision_hook,
                                                        with_kwargs=True),
           inner.text_model.register_forward_pre_hook(text_hook,
                                                      with_kwargs=True)]
  inputs = dict(
      input_ids=torch.as_tensor(np.asarray(batch.tokens), dtype=torch.long),
      attention_mask=torch.as_tensor(np.asarray(batch.mask),
                                     dtype=torch.long),
      pixel_values=torch.as_tensor(np.asarray(batch.pixel_values)),
      pixel_attention_mask=torch.as_tensor(np.asarray(batch.pixel_mask)))
  runs, counts = [], None
  try:
    for rep in range(repeats):
      torch.manual_seed(rep)
      calls["vision"].clear(), calls["text"].clear()
      start = time.perf_counter()
      with torch.inference_mode():
        out = model.generate(
            **inputs, num_return_sequences=k, do_sample=True,
            temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=t,
            max_new_tokens=t, pad_token_id=pad_id)
      runs.append(time.perf_counter() - start)
      new = out.shape[1] - inputs["input_ids"].shape[1]
      assert out.shape[0] == batch.tokens.shape[0] * k and new == t, (
          out.shape, new)
      if counts is None:
        counts = dict(vision_calls=list(calls["vision"]),
                      prefill_calls=calls["text"][:1],
                      text_forwards=len(calls["text"]),
                      vision_rows=sum(s[0] for s in calls["vision"]),
                      prefill_rows=calls["text"][0][0])
  finally:
    for h in hooks:
      h.remove()
  return dict(counts, runs_s=runs, s=min(runs))


# ----------------------------------------------------------------------------
# Main


def print_table(row: dict) -> None:
  b, tiles = row["B"], row["tiles_per_image"]
  print(f"\nB={b} prompts x 1 image ({tiles} tiles each, {row['slots']} "
        f"image slots), T={row['T']} new tokens, shape {row['shape']}, "
        f"{row['prompt_tokens']} prompt tokens")
  sides = ["ours"] + row["peers"]
  w = [max(len(n), 22) for n in sides]
  print(f"{'':>3}   " + " | ".join(f"{n:^{x}}" for n, x in zip(sides, w)))
  sub = f"{'vision':>7}{'prefill':>8}{'s':>7}"
  head = f"{'K':>3} | " + " | ".join(f"{sub:>{x}}" for x in w)
  print(head)
  print("-" * len(head))
  for r in row["per_k"]:
    cells = []
    for n, x in zip(sides, w):
      c = r[n]
      cell = f"{c['vision_rows']:>7}{c['prefill_rows']:>8}{c['s']:>7.3f}"
      cells.append(f"{cell:>{x}}")
    print(f"{r['K']:>3} | " + " | ".join(cells))
  print("vision: tiles through the vision tower (ours: all B x I slots, "
        "padding included; transformers drops all-zero slots); prefill: rows "
        "of the prompt pass; s: best wall seconds of one call (ours after "
        "compile: " + ", ".join(f"{r['ours']['compile_s']:.1f}"
                                for r in row["per_k"]) +
        f" s). Load average {row['load_avg']}.")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
  parser.add_argument("--ks", default="1,4,8",
                      help="candidates per prompt, comma separated")
  parser.add_argument("--prompts", type=int, default=2)
  parser.add_argument("--new-tokens", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed calls per side and K (default 3 tiny, "
                      "1 smolvlm-256m)")
  parser.add_argument("--peers", default=None,
                      help=f"comma separated, of {PEERS}; '' for none "
                      "(default both for tiny, generate for smolvlm-256m)")
  parser.add_argument("--workdir", default=None,
                      help="where the model directory is written (default "
                      "a temporary one)")
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args(argv)
  ks = [int(x) for x in args.ks.split(",")]
  b = args.prompts
  t = args.new_tokens or SHAPES[args.shape]["new_tokens"]
  repeats = args.repeats or (3 if args.shape == "tiny" else 1)
  if args.peers is None:
    args.peers = ",".join(PEERS) if args.shape == "tiny" else "generate"
  peer_modes = [m for m in args.peers.split(",") if m]

  import jax
  from flax import nnx
  from purld_jax.models import idefics3_hf
  from purld_jax.train import student as student_lib

  loads = [sampling_bench.load()]
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(args.workdir or tmp, f"vlm-{args.shape}")
    start = time.perf_counter()
    if not os.path.isfile(os.path.join(path, "config.json")):
      build_model_dir(args.shape, path)
    build_s = time.perf_counter() - start
    student = student_lib.make(path=path, dtype_name="float32",
                               param_dtype_name="float32", init_seed=0,
                               cache_dir="", workdir=path)
    batch = prompt_batch(student, b)
    tiles = tiles_per_image(batch)
    assert len(set(tiles)) == 1, tiles
    model = idefics3_hf.load_model(path, dtype=jax.numpy.float32)
    graphdef, params = nnx.split(model)
    pad_id = student.tokenizer.pad_id
    print(f"{sampling_bench.machine()['cpu']} x {os.cpu_count()}; "
          f"jax {jax.__version__}; shape {args.shape} (built in "
          f"{build_s:.1f} s); B={b} prompts of {batch.tokens.shape[1]} "
          f"tokens, {tiles[0]} tiles an image in "
          f"{batch.pixel_values.shape[1]} slots of "
          f"{batch.pixel_values.shape[-1]} px; T={t}; load {loads[0]}",
          flush=True)
    peer = load_peer(path) if peer_modes else None
    per_k = []
    for k in ks:
      r = dict(K=k)
      r["ours"] = run_ours(graphdef, params, batch, k, t, pad_id, repeats)
      print(f"  K={k} ours: vision {r['ours']['vision_calls']}, prefill "
            f"{r['ours']['prefill_calls']}, {r['ours']['s']:.2f} s "
            f"(compile {r['ours']['compile_s']:.1f} s; load "
            f"{sampling_bench.load()})", flush=True)
      for mode in peer_modes:
        r[mode] = run_peer(peer, batch, k, t, pad_id, repeats, mode)
        print(f"  K={k} {mode}: vision {r[mode]['vision_calls']}, prefill "
              f"{r[mode]['prefill_calls']}, {r[mode]['s']:.2f} s (load "
              f"{sampling_bench.load()})", flush=True)
      per_k.append(r)
  loads.append(sampling_bench.load())

  settings = dict(shape=args.shape, B=b, K=ks, T=t, repeats=repeats,
                  peers=peer_modes,
                  omp_wait=os.environ.get("OMP_WAIT_POLICY"))
  row = dict(peers.header(settings), bench="vlm_sampling", shape=args.shape,
             B=b, T=t, tiles_per_image=tiles[0],
             slots=int(batch.pixel_values.shape[1]),
             prompt_tokens=int(batch.tokens.shape[1]), peers=peer_modes,
             per_k=per_k,
             load_avg=loads)
  print_table(row)
  with open(args.out, "a", encoding="utf-8") as f:
    f.write(json.dumps(row) + "\n")
  return row


if __name__ == "__main__":
  main()
  sys.exit(0)
