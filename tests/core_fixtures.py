"""Shared fixtures of the core tests (scoring, ranking): a word-level chat
tokenizer small enough for `llama.tiny_config`, and a tiny random model.

Import the fixtures into a test module with
`from tests.core_fixtures import tiny_tok, tiny_model  # noqa: F401`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from purld_jax.models import llama
from purld_jax.models import tokenizer as tok_lib

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = ("system user assistant Yes No yes no the a an is of to and what "
         "answer question reference response draft candidate good better "
         "as than final write your own now A B : ? . , ! + = "
         "0 1 2 3 4 5 6 7 8 9 two three four five cat dog sat on mat").split()
# A ChatML template without a default system turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_word_tokenizer(path) -> None:
  """Saves a WordLevel HF tokenizer (unknown words -> <unk>) into `path`."""
  import tokenizers
  import transformers
  vocab = {w: i for i, w in enumerate(SPECIALS + list(dict.fromkeys(WORDS)))}
  core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab,
                                                          unk_token="<unk>"))
  core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  core.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins with " "
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
      eos_token="<|im_end|>", additional_special_tokens=SPECIALS[2:])
  hf.chat_template = CHAT_TEMPLATE
  hf.save_pretrained(str(path))


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory):
  """`tok_lib.Tokenizer` over the word-level vocabulary (< 128 ids)."""
  path = tmp_path_factory.mktemp("word_tok")
  write_word_tokenizer(path)
  return tok_lib.load(path)


def random_tiny_model(*, vocab_size=128, seed=0, scale=0.1, **cfg_overrides):
  """A `llama.Llama` of `llama.tiny_config` with numpy-drawn weights.

  Built from the abstract model (nnx.eval_shape) and filled on the host:
  N(0, scale^2) matrices, unit norm scales (1-d params). Much faster on a
  busy CPU than the eager random init, which compiles op by op.
  """
  cfg = llama.tiny_config(vocab_size=vocab_size, **cfg_overrides)
  graphdef, state = nnx.split(
      nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def draw(x):
    if len(x.shape) == 1:
      return jnp.ones(x.shape, x.dtype)
    return jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype)

  return nnx.merge(graphdef, jax.tree.map(draw, state))


@pytest.fixture(scope="session")
def tiny_model(tiny_tok):
  """A random tiny `llama.Llama` over `tiny_tok`'s vocabulary, float32."""
  model = random_tiny_model(vocab_size=128)
  assert tiny_tok.vocab_size <= model.cfg.vocab_size
  return model
