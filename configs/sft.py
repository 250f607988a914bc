r"""Stage 1 only: SFT of the student on the teacher's anchors.

  python -m purld_jax.main --config=configs/sft.py --workdir=workdirs/sft \
      --config.teacher.base_url=http://127.0.0.1:8080/v1 --config.teacher.model=NAME
  python -m purld_jax.main --config=configs/sft.py:tiny --workdir=/tmp/sft_tiny

The result is the frozen reference (workdir/reference, an HF directory) and
the "SFT on anchors" baseline of METHOD.md. Variants (after the colon):
  ''      the embedded SmolLM2-135M on the prompt set of data.train_path
  tiny    a random tiny model and a character tokenizer: CPU, seconds
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base()
  c.recipe = "sft"
  c.sft.steps = 200
  return common.variant(c, arg, name="configs/sft.py")
