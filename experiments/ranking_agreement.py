r"""Does the student's self-ranking agree with the oracle? One table per scheme.

  python experiments/ranking_agreement.py --model=workdirs/demo/reference
  python experiments/ranking_agreement.py --model=DIR --prompts=data/demo/train.jsonl \
      --num_prompts=64 --k=8 --temperature=1.0 --schemes=anchor_recon,judge,pmi

Samples K candidates for each of the first N verifiable prompts with the
model, scores the same candidate pool with every scheme (anchor = the
prompt's reference answer, as the demo's simulated teacher gives it) and
prints `diagnostics.ranking_vs_oracle` per scheme: the share of right
samples, of prompts with both right and wrong candidates (the only ones a
ranking can order), and, on those, how often the top-scored candidate is
right and the share of (right, wrong) pairs ordered right. Also writes the
rows as JSON lines to --out when given.
"""

from __future__ import annotations

import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "HF model directory (e.g. a "
                             "run's WORKDIR/reference); default: the "
                             "embedded SmolLM2-135M-Instruct")
_PROMPTS = flags.DEFINE_string("prompts", "data/demo/train.jsonl",
                               "JSONL prompts with an `answer` field")
_N = flags.DEFINE_integer("num_prompts", 32, "first N prompts of the file")
_K = flags.DEFINE_integer("k", 4, "candidates per prompt")
_T = flags.DEFINE_integer("max_new_tokens", 8, "longest candidate")
_TEMP = flags.DEFINE_float("temperature", 1.0, "sampling temperature")
_SEED = flags.DEFINE_integer("seed", 0, "sampling key")
_SCHEMES = flags.DEFINE_list("schemes", "anchor_recon,judge,pmi,similarity",
                             "ranking schemes to compare")
_BUCKET = flags.DEFINE_integer("bucket", 64, "prompt length bucket")
_OUT = flags.DEFINE_string("out", None, "append the rows to this JSONL file")


def main(argv):
  del argv
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from purld_jax import data  # pylint: disable=g-import-not-at-top
  from purld_jax import diagnostics  # pylint: disable=g-import-not-at-top
  from purld_jax import evaluate  # pylint: disable=g-import-not-at-top
  from purld_jax import models  # pylint: disable=g-import-not-at-top
  from purld_jax import prompts  # pylint: disable=g-import-not-at-top
  from purld_jax import ranking  # pylint: disable=g-import-not-at-top
  from purld_jax import sampling  # pylint: disable=g-import-not-at-top
  from purld_jax import templates  # pylint: disable=g-import-not-at-top
  from purld_jax.models import embedded  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  path = _MODEL.value or str(embedded.ensure_converted())
  model, tok = models.load_pretrained(path, dtype=jnp.float32)
  graphdef, params = nnx.split(model)
  records = prompts.read_jsonl(_PROMPTS.value)[:_N.value]
  if any(p.answer is None for p in records):
    raise app.UsageError(f"{_PROMPTS.value}: every prompt needs an answer")
  src = data.encode(records, tok, max_len=_BUCKET.value)
  batch = next(data.eval_batches(src, batch_size=len(src.ids),
                                 buckets=(_BUCKET.value,), process_index=0,
                                 process_count=1))
  sp = sampling.SamplingParams(temperature=_TEMP.value,
                               max_new_tokens=_T.value,
                               stop_ids=tuple(tok.stop_ids))
  k = _K.value
  c = jax.device_get(sampling.sample(
      graphdef, params, jnp.asarray(batch.tokens), jnp.asarray(batch.mask),
      jax.random.key(_SEED.value),
      prompt_index=jnp.asarray(batch.index, jnp.int32), num_candidates=k,
      sampling=sp, pad_id=tok.pad_id))
  n = len(src.ids)
  cands = [[list(c.tokens[i, j, :c.lengths[i, j]]) for j in range(k)]
           for i in range(n)]
  answers = [p.answer for p in batch.prompts[:n]]
  correct = np.array([
      [evaluate.verify(tok.decode(templates.cut_at_stop(y, tok.stop_ids)), a)
       for y in g] for g, a in zip(cands, answers)])
  msgs = [p.as_dicts() for p in batch.prompts[:n]]
  print(f"model {path}; {n} prompts of {_PROMPTS.value}; K={k}, "
        f"temperature {_TEMP.value}; anchors = reference answers")
  print(f"{'scheme':<14} {'right':>6} {'mixed':>6} {'top right':>10} "
        f"{'pair acc':>9} {'seconds':>8}")
  for scheme in _SCHEMES.value:
    t0 = time.perf_counter()
    s, _ = ranking.score_group(
        model, tok, msgs, answers, cands, scheme=scheme,
        verifier=lambda b, text: evaluate.verify(text, answers[b]))
    d = diagnostics.ranking_vs_oracle(s, correct)
    secs = time.perf_counter() - t0
    print(f"{scheme:<14} {d['sample_accuracy']:>6.3f} {d['mixed_groups']:>6.3f}"
          f" {d['top_right']:>10.3f} {d['pair_accuracy']:>9.3f} {secs:>8.1f}")
    if _OUT.value:
      with open(_OUT.value, "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(d, scheme=scheme, model=path, k=k,
                                prompts=n, temperature=_TEMP.value,
                                seconds=secs)) + "\n")
  print("top right: chance = the share of right candidates in a mixed "
        "prompt; pair acc: chance = 0.5")


if __name__ == "__main__":
  app.run(main)
