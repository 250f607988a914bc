"""The embedded SmolLM2-135M-Instruct: JAX against transformers + torch."""

import jax.numpy as jnp
import numpy as np
import pytest

from purld_jax import models
from purld_jax.models import embedded
from purld_jax.models import tokenizer as tok_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Compute 17 * 23 and explain each step.",
    "Translate 'good morning' into Spanish and German.",
    "List three prime numbers greater than 100.",
]


@pytest.fixture(scope="module")
def smollm2():
  path = embedded.ensure_converted()
  model, tok = models.load_pretrained(path)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      str(path), dtype=torch.float32).eval()
  return path, model, tok, ref


def test_chat_template_renders_chatml(smollm2):
  """The template from the GGUF metadata renders SmolLM2's ChatML format."""
  _, _, tok, _ = smollm2
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Hi"}]
  want = ("<|im_start|>system\nBe brief.<|im_end|>\n"
          "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  assert tok.render_chat(messages) == want
  ids = tok.hf.apply_chat_template(messages, tokenize=True,
                                   add_generation_prompt=True)
  ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(
      ids, "keys") else ids
  assert tok.encode_chat(messages) == list(ids)
  assert tok.hf.convert_tokens_to_ids("<|im_end|>") in tok.stop_ids


def test_logits_match_transformers_on_chat_prompts(smollm2):
  """Top-1 agreement 100 % and max |diff| <= 1e-3 on 5 chat prompts."""
  _, model, tok, ref = smollm2
  rows = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
  tokens, mask = tok_lib.pad_left(rows, tok.pad_id)
  got = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
  for i, row in enumerate(rows):
    with torch.no_grad():
      want = ref(input_ids=torch.tensor([row])).logits[0].numpy()
    mine = got[i, -len(row):]
    np.testing.assert_array_equal(mine.argmax(-1), want.argmax(-1))
    assert np.abs(mine - want).max() <= 1e-3


def test_save_pretrained_round_trip(smollm2, tmp_path):
  path, model, tok, ref = smollm2
  models.save_pretrained(model, tok, tmp_path)
  again, tok2 = models.load_pretrained(tmp_path)
  ids = tok2.encode_chat([{"role": "user", "content": PROMPTS[0]}])
  assert ids == tok.encode_chat([{"role": "user", "content": PROMPTS[0]}])
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), dtype=torch.float32).eval()
  with torch.no_grad():
    a = reloaded(input_ids=torch.tensor([ids])).logits.numpy()
    b = ref(input_ids=torch.tensor([ids])).logits.numpy()
  np.testing.assert_array_equal(a, b)  # same tensors, same oracle


def test_chat_demo_streams_the_greedy_answer(smollm2):
  """chat.Decoder's cached decode is greedy under the full forward.

  One uncached forward over prompt + answer: at every answer position the
  argmax of the previous position's logits must be the token generated.
  """
  import io
  from purld_jax import chat
  _, model, tok, _ = smollm2
  messages = [{"role": "user", "content": PROMPTS[0]}]
  out = io.StringIO()
  reply = chat.Decoder(model, tok, max_new_tokens=6, err=io.StringIO()).reply(
      messages, out=out)
  prompt = tok.encode_chat(messages)
  answer = reply.ids
  assert 0 < len(answer) <= 6 and tok.decode(answer) == reply.text
  logits = np.asarray(model(jnp.asarray([prompt + answer], jnp.int32)))[0]
  greedy = logits[len(prompt) - 1:-1].argmax(-1)
  np.testing.assert_array_equal(greedy, answer)
  assert out.getvalue().strip() == reply.text.strip()
