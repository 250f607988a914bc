"""Images attached to prompts: read, checked, and encoded for a teacher.

A prompt's images are the encoded files themselves (PNG, JPEG, WebP or GIF
bytes), kept as read so that the ledger key (a hash of the bytes) and what is
sent to the teacher are the same thing. Decoding to pixels is the student's
business (the model's processor); here an image is only checked to be one
that PIL can decode and that an OpenAI-compatible endpoint accepts.

Limits (``MAX_IMAGES``, ``MAX_IMAGE_BYTES``): at most 8 images per prompt and
20 MiB per encoded image. 20 MiB is the per-image limit of the OpenAI API;
8 keeps a prompt's image tokens bounded for a small student (SmolVLM spends
hundreds of tokens per image once it is split into tiles) while leaving room
for multi-image prompts. Formats are those the OpenAI API takes (``MIME``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re

MAX_IMAGES = 8
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp",
        "GIF": "image/gif"}
_DATA_URI = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,")


class ImageError(ValueError):
  """An image that cannot be used; the message says why (no location)."""


def image_format(data: bytes) -> str:
  """PIL's format name ("PNG", "JPEG", ...) of encoded image bytes, after
  decoding them fully (a truncated file fails here, not in the student).

  Raises:
    ImageError: not an image PIL can decode, or not a format in MIME.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      fmt = im.format
  except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, ...)
    raise ImageError(f"not an image PIL can open ({type(e).__name__}: "
                     f"{str(e)[:80]})") from None
  if fmt not in MIME:
    raise ImageError(f"image format {fmt} is not accepted (use one of "
                     f"{', '.join(sorted(MIME))})")
  return fmt


def mime(data: bytes) -> str:
  """'image/png' etc. of image bytes, from the header alone (cheap; the bytes
  were checked by ``image_format`` when read)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as im:
      fmt = im.format
  except Exception as e:
    raise ImageError(f"not an image PIL can open ({type(e).__name__})") from None
  if fmt not in MIME:
    raise ImageError(f"image format {fmt} is not accepted")
  return MIME[fmt]


def read(spec: str, base_dir: str | None) -> bytes:
  """An image's bytes from a path or a ``data:image/<type>;base64,`` URI.

  A relative path is relative to ``base_dir`` (the prompt file's folder;
  None: the working directory). The bytes are checked (``image_format``).

  Raises:
    ImageError: missing file, bad base64, too large, or not an image.
  """
  if not isinstance(spec, str) or not spec:
    raise ImageError("must be a non-empty string: a path or a data: URI")
  if spec.startswith("data:"):
    match = _DATA_URI.match(spec)
    if not match:
      raise ImageError("a data URI must start 'data:image/<type>;base64,'")
    try:
      data = base64.b64decode(spec[match.end():], validate=True)
    except (binascii.Error, ValueError) as e:
      raise ImageError(f"bad base64 in the data URI ({e})") from None
  else:
    path = spec if os.path.isabs(spec) or base_dir is None else os.path.join(
        base_dir, spec)
    if not os.path.isfile(path):
      raise ImageError(f"no such image file {path}")
    if os.path.getsize(path) > MAX_IMAGE_BYTES:
      raise ImageError(f"{path} is larger than {MAX_IMAGE_BYTES} bytes")
    with open(path, "rb") as f:
      data = f.read()
  if len(data) > MAX_IMAGE_BYTES:
    raise ImageError(f"image larger than {MAX_IMAGE_BYTES} bytes")
  image_format(data)
  return data


def data_uri(data: bytes) -> str:
  """``data:image/<type>;base64,...`` of image bytes (what a teacher is sent)."""
  return f"data:{mime(data)};base64,{base64.b64encode(data).decode('ascii')}"


def digest(data: bytes) -> str:
  """sha256 hex of the encoded bytes: an image's identity in ledger keys and
  deduplication."""
  return hashlib.sha256(data).hexdigest()
