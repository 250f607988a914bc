r"""Baseline "teacher-as-judge" (RLAIF, METHOD.md): the TEACHER scores every
candidate from 1 to 10 (purld_jax/teacher_judge.py), K teacher calls per
prompt and step on top of the anchor: the costly reference. DPO on best vs
worst.

  python -m purld_jax.main --config=configs/baselines/teacher_judge.py \
      --workdir=workdirs/bl_teacher_judge
  python -m purld_jax.main --config=configs/baselines/teacher_judge.py:tiny \
      --workdir=/tmp/bl_teacher_judge

The model, data and teacher are overridden as in README "Training".

Judgements are kept in WORKDIR/judgements.sqlite (a ledger like the
anchors': a resumed run never pays one twice); metrics.jsonl logs
`judge_calls` (cumulative) beside `teacher_calls`. With teacher.backend =
dataset (the tiny variant) the judge is SIMULATED: 10 when the candidate's
last number equals the reference answer, else 1, i.e. the oracle.
Variants: '' and tiny (CPU, seconds).
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base()
  c.recipe = "dpo"
  c.ranking.scheme = "teacher_judge"    # the teacher scores each candidate
  # ranking.template: '' = teacher_judge.JUDGE_TEMPLATE ({prompt}, {response};
  # the reply is read by teacher_judge.parse_score, scores 1..10).
  c.ranking.template = ""
  # The judge is the `teacher` block's endpoint, params and retries (its
  # max_tokens also bounds the anchors: leave it); an unparseable reply is
  # re-asked up to teacher.max_retries times (teacher_judge.py).
  c.preference.kind = "pairwise"        # DPO pairs from the judge's scores
  c.preference.pairs = "best_vs_worst"  # as configs/purld_dpo.py
  c.sampling.num_candidates = 8         # K: K judge calls per prompt and step
  c.sft.steps = 200                     # stage 1 length
  c.rl.steps = 500                      # PU-RL iterations
  return common.variant(c, arg, name="configs/baselines/teacher_judge.py")
