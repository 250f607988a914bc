"""purld_jax.chat with images: a vision-language student directory
(tiny random Idefics3 and Qwen2.5-VL) answers an image prompt as the
sampler does; --image / `/image PATH` put images into the current user
turn; a text model or a bad file is refused in one line."""

import dataclasses
import io
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from purld_jax import chat
from purld_jax import chat_images
from purld_jax import models
from purld_jax import prompts as prompts_lib
from purld_jax import sampling
from purld_jax import templates
from purld_jax import vision
from purld_jax.models import tiny_qwen_vl
from purld_jax.models import tokenizer as tok_lib
from tests import vlm_fixtures
from tests.core_fixtures import tiny_model, tiny_tok  # noqa: F401
from tests.train_fixtures import REPO, subprocess_env


@pytest.fixture(scope="module", params=["idefics3", "qwen2_5_vl"])
def vlm(request, tmp_path_factory):
  d = tmp_path_factory.mktemp(request.param)
  path = (str(vlm_fixtures.make_vlm_dir(d)) if request.param == "idefics3"
          else str(tiny_qwen_vl.ensure(d / "tiny")))
  png = d / "picture.png"
  png.write_bytes(vlm_fixtures.png(7, 16, 20))
  return path, str(png), chat_images.load(path)


def _sampler_answer(model, tok, processor, prompt, max_new_tokens):
  """The sampler's greedy answer (token ids, cut at the stop) to `prompt`,
  encoded as a training prompt is (`vision.encode_prompt`, unpadded)."""
  ids, _, _ = vision.encode_prompt(processor, tok, prompt)
  pv, pm = vision.pixels_of(processor.image_processor, [prompt])
  tokens, mask = tok_lib.pad_left([list(ids)], tok.pad_id, len(ids))
  from flax import nnx
  graphdef, params = nnx.split(model)
  c = jax.device_get(sampling.sample(
      graphdef, params, jnp.asarray(tokens), jnp.asarray(mask),
      jax.random.PRNGKey(0), prompt_index=jnp.zeros((1,), jnp.int32),
      num_candidates=1, sampling=sampling.SamplingParams(
          temperature=0.0, max_new_tokens=max_new_tokens,
          stop_ids=tok.stop_ids),
      pad_id=tok.pad_id, pixel_values=jnp.asarray(pv),
      pixel_mask=jnp.asarray(pm)))
  return templates.cut_at_stop(c.tokens[0, 0, :c.lengths[0, 0]],
                               tok.stop_ids), ids


def test_the_chats_greedy_answer_is_the_samplers(vlm):
  path, png, (model, tok, processor) = vlm
  tok = dataclasses.replace(tok, stop_ids=())  # every answer 5 tokens long
  image = chat_images.read_image(png)
  messages = [{"role": "user", "content": "Colour?", "images": [image]}]
  dec = chat_images.VisionDecoder(model, tok, processor, max_new_tokens=5,
                                  err=io.StringIO())
  out = io.StringIO()
  reply = dec.reply(messages, out=out)
  prompt = prompts_lib.Prompt(id="p", messages=(("user", "Colour?"),),
                              images=(open(png, "rb").read(),))
  want, want_ids = _sampler_answer(model, tok, processor, prompt, 5)
  assert chat_images.encode(processor, tok, messages)[0] == list(want_ids)
  assert len(reply.ids) == 5 and reply.ids == want, path
  assert out.getvalue() == reply.text + "\n"
  # the image is in the prompt: another image, another prompt's pixels
  other = vision.pil_images(prompts_lib.Prompt(
      id="q", messages=(), images=(vlm_fixtures.png(8, 16, 20),)))[0]
  a = chat_images.encode(processor, tok, messages)[1]
  b = chat_images.encode(processor, tok, [dict(messages[0],
                                               images=[other])])[1]
  assert a.shape == b.shape and np.abs(a - b).max() > 0


def test_a_later_turn_keeps_the_earlier_image(vlm):
  # two turns, the image in the first: both the chat's rows and the
  # processor's pixels hold it, and the second turn's own image follows
  _, png, (_, tok, processor) = vlm
  image = chat_images.read_image(png)
  turns = [{"role": "user", "content": "Colour?", "images": [image]},
           {"role": "assistant", "content": "red"},
           {"role": "user", "content": "And now?", "images": [image]}]
  ids, _, pm = chat_images.encode(processor, tok, turns)
  one, _, pm1 = chat_images.encode(processor, tok, turns[:1])
  text = tok.render_chat(chat_images.chat_dicts(turns))
  assert text.index("Colour?") < text.index("And now?")
  n = lambda x: x.count(processor.image_token_id)
  assert n(ids) == 2 * n(one) > 0
  real = lambda m: np.asarray(m).reshape(m.shape[0], m.shape[1], -1).any(-1)
  assert real(pm).sum() == 2 * real(pm1).sum()


class FakeModel:
  def __init__(self):
    self.calls = []

  def __call__(self, messages):
    self.calls.append([dict(m) for m in messages])
    return f"answer {len(self.calls)}"


def test_images_go_into_the_current_user_turn():
  gen, err = FakeModel(), io.StringIO()

  def attach(path):
    if path == "missing.png":
      raise ValueError("missing.png: no such file")
    return f"<{path}>"

  chat.chat_loop(["first", "/image b.png", "/image missing.png", "/image",
                  "second", "third"], gen, images=["<a.png>"], attach=attach,
                 err=err)
  users = [[m.get("images") for m in c if m["role"] == "user"]
           for c in gen.calls]
  assert users == [[["<a.png>"]], [["<a.png>"], ["<b.png>"]],
                   [["<a.png>"], ["<b.png>"], None]]
  assert "[chat] /image: missing.png: no such file" in err.getvalue()
  assert "[chat] /image: which file? (/image PATH)" in err.getvalue()
  gen, err = FakeModel(), io.StringIO()
  chat.chat_loop(["/image a.png", "hi"], gen, err=err)  # no attach
  assert gen.calls == [[{"role": "user", "content": "hi"}]]
  assert "[chat] /image: this model takes no images" in err.getvalue()


def test_read_image_names_the_file(tmp_path):
  with pytest.raises(ValueError, match="nope.png: no such file"):
    chat_images.read_image(str(tmp_path / "nope.png"))
  bad = tmp_path / "bad.png"
  bad.write_text("not an image")
  with pytest.raises(ValueError, match="bad.png: cannot be read as an "
                     "image"):
    chat_images.read_image(str(bad))


def _chat(args, stdin=""):
  return subprocess.run(
      [sys.executable, "-m", "purld_jax.chat", "--jit_cache_dir=", *args],
      input=stdin, capture_output=True, text=True, cwd=REPO,
      env=subprocess_env(), timeout=900, check=False)


def _one_line_error(r, want):
  assert r.returncode == 2 and r.stdout == ""
  assert "Traceback" not in r.stderr
  assert r.stderr.strip() == want


def test_image_errors_are_one_line(tiny_model, tiny_tok, tmp_path):  # noqa: F811
  text_dir = tmp_path / "text"
  models.save_pretrained(tiny_model, tiny_tok, text_dir)
  png = tmp_path / "p.png"
  png.write_bytes(vlm_fixtures.png(1))
  bad = tmp_path / "bad.png"
  bad.write_text("not an image")
  _one_line_error(_chat([f"--model={text_dir}", f"--image={png}",
                         "--prompt=hi"]),
                  f"error: --image: --model={text_dir} is a text model (no "
                  "vision tower); images need a vision-language student "
                  "directory (Idefics3 / SmolVLM, Qwen2.5-VL)")
  _one_line_error(_chat([f"--model={text_dir}",
                         f"--image={tmp_path / 'no.png'}", "--prompt=hi"]),
                  f"error: --image={tmp_path / 'no.png'}: no such file")
  _one_line_error(_chat([f"--model={text_dir}", f"--image={bad}",
                         "--prompt=hi"]),
                  f"error: --image={bad}: cannot be read as an image "
                  "(UnidentifiedImageError)")


@pytest.mark.slow  # ~22 s, subprocesses; the in-process chat test stays fast
def test_the_command_line_answers_an_image_prompt(tmp_path):
  # --image and a piped `/image PATH` give the answer of the same prompt
  path = str(vlm_fixtures.make_vlm_dir(tmp_path / "vlm"))
  png = tmp_path / "picture.png"
  png.write_bytes(vlm_fixtures.png(7, 16, 20))
  model, tok, processor = chat_images.load(path)
  dec = chat_images.VisionDecoder(model, tok, processor, max_new_tokens=4,
                                  err=io.StringIO())
  want = dec.reply([{"role": "user", "content": "Colour?",
                     "images": [chat_images.read_image(str(png))]}]).text
  flag = _chat([f"--model={path}", f"--image={png}", "--prompt=Colour?",
                "--max_new_tokens=4"])
  piped = _chat([f"--model={path}", "--max_new_tokens=4"],
                stdin=f"/image {png}\nColour?\n")
  for r in (flag, piped):
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    assert "Traceback" not in r.stderr
  assert f"[chat] {png} goes with your next message" in piped.stderr
