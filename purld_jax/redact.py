"""Keeping API keys out of logs, errors, configs and checkpoints.

The teacher's key lives in an environment variable that
`teacher.api_key_env` names; the key itself is read by the HTTP client
only. Two slips still put a key in plain sight: typing the key where its
variable's NAME goes (the config, with that field, is written to
WORKDIR/config.json and into every checkpoint), and passing it as a flag
that an error message echoes. `check_key_env` refuses the first before
anything is written; `hide` hides flag values of key-like fields in any
message shown.
"""

from __future__ import annotations

import re

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY_PREFIX = re.compile(r"^(sk|pk|rk|hf|gsk|xai|key)[-_]", re.I)
# A field that holds a secret: api_key, key, token, auth_token, secret, ...
# (not max_tokens, not yes_word).
_SECRET_FIELD = re.compile(r"(^|_)(api_?key|key|token|secret|password)$", re.I)
HIDDEN = "<hidden>"


def looks_like_key(value: str) -> bool:
  """True for what is more likely a secret than a variable name: a known
  key prefix (sk-, hf_, ...), or 24+ characters mixing lower case and
  digits (names are words: OPENAI_API_KEY)."""
  value = str(value)
  if any(c in value for c in "/\\ .:"):  # a path, a URL, a sentence
    return False
  if _KEY_PREFIX.match(value):
    return True
  return (len(value) >= 24 and any(c.isdigit() for c in value)
          and any(c.islower() for c in value))


def check_key_env(name: str, field: str = "teacher.api_key_env") -> str | None:
  """An error message (without the value) when `name` is not an
  environment variable's name or looks like a key; None when it is fine
  ('' = no key)."""
  if not name:
    return None
  if looks_like_key(name) or not _ENV_NAME.fullmatch(name):
    return (f"{field}: not the NAME of an environment variable (the value "
            "is not shown: it may be the key itself); export the key, e.g. "
            f"`export OPENAI_API_KEY=...`, and set {field}=OPENAI_API_KEY")
  return None


def hide(text: str, argv=()) -> str:
  """`text` with the values of key-like flags in `argv` (a field named
  api_key, key, token, secret, password, e.g. --config.teacher.api_key=...;
  not api_key_env, which holds a NAME) and any key-looking flag value
  replaced by <hidden>."""
  for arg in argv:
    m = re.match(r"--?([^=]+)=(.+)$", str(arg))
    if not m:
      continue
    field, value = m.group(1).split(".")[-1], m.group(2)
    secret = _SECRET_FIELD.search(field) or looks_like_key(value)
    if secret and len(value) >= 4:  # "8" is nobody's key: text stays whole
      text = text.replace(value, HIDDEN)
  return text
