"""PU-RL with pairwise preferences (METHOD.md steps 5-6, `recipe = "dpo"`).

Pairs come from the self-ranking scores (`preference.pairs`): best over
worst, every pair above a margin, likely-positive over unlabeled (PU), or
the SPIN-like baseline anchor over worst; under `pu.mode = "gate"` a chosen
member is always a likely positive or the anchor (purld_jax/pu.py). The
loss is DPO (sigmoid, IPO or hinge) on sequence log-probs of chosen and
rejected members, the reference being the frozen SFT model. Under
`pu.mode = "nnpu"` nothing is ranked (`rollout.UNRANKED`): the "pairs"
are the anchor against each valid candidate, and the loss is the non-negative PU risk of
the implicit reward (`losses.nnpu`), anchors positive, candidates
unlabeled. Only the members some pair uses are scored
(`compact`), each prompt run once for them (`scoring.response_logps`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from purld_jax import losses
from purld_jax import preferences
from purld_jax import pu as pu_lib
from purld_jax import scoring
from purld_jax.train import state as state_lib

STAGE = "dpo"


def make_pairs(scores, anchor_score, *, rule: str, margin: float,
               mode: str = "gate", delta: float = 0.0, prior: float = 0.5,
               anchor_fallback: bool = True,
               valid=None) -> preferences.Pairs:
  """Pairs [B, M] over members (index K = the anchor) from scores [B, K].

  `mode` is `pu.mode` (purld_jax/pu.py): "gate" trains only toward likely
  positives (chosen in P, rejected outside; P empty: anchor over worst or
  nothing); "shift" ranks s - s_a (the ablation; "pu" pairs then take the
  top ceil(prior K) as positives); "nnpu" gives the anchor against every
  valid candidate (M = K), whatever `rule`. "anchor_as_chosen" is
  mode-free.
  """
  scores, anchor_score = jnp.asarray(scores), jnp.asarray(anchor_score)
  if rule not in pu_lib.PAIR_RULES:
    raise ValueError(f"preference.pairs {rule!r} is not one of "
                     f"{', '.join(pu_lib.PAIR_RULES)}")
  if mode == "nnpu":  # anchor (K) against every valid candidate
    b, k = scores.shape
    pairs = preferences.Pairs(jnp.full((b, k), k, jnp.int32),
                              jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32),
                                               (b, k)),
                              jnp.ones((b, k), bool))
  elif rule == "anchor_as_chosen":
    pairs = preferences.anchor_as_chosen(scores)
  elif mode == "gate":
    positive = pu_lib.gate_positives(scores, anchor_score, delta=delta,
                                     prior=prior)
    pairs = pu_lib.gated_pairs(scores, positive, rule=rule, margin=margin,
                               anchor_fallback=anchor_fallback)
  elif mode == "shift":
    cal, positive = preferences.calibrate(scores, anchor_score, center=True,
                                          prior=prior or None)
    if rule == "best_vs_worst":
      pairs = preferences.best_vs_worst(cal, min_gap=margin)
    elif rule == "margin":
      pairs = preferences.margin_pairs(cal, margin=margin)
    else:
      pairs = preferences.pu_pairs(positive)
  else:
    raise ValueError(f"pu.mode {mode!r} not in {pu_lib.MODES}")
  if valid is not None:
    pairs = pairs._replace(mask=pairs.mask & jnp.asarray(valid)[:, None])
  return pairs


def group_pairs(group, config) -> preferences.Pairs:
  """The pairs [B, M] of a `rollout.Group` under the config's
  `preference.*` and `pu.*` (`make_pairs`)."""
  pu, pref = config.pu, config.preference
  return make_pairs(group.scores, group.anchor_score, rule=pref.pairs,
                    margin=pref.margin, mode=pu.mode, delta=pu.delta,
                    prior=pu.prior, anchor_fallback=pu.anchor_fallback,
                    valid=group.valid)


def signal(group, config) -> np.ndarray:
  """bool[B] the groups with at least one pair (`rl.oversample`)."""
  return np.asarray(group_pairs(group, config).mask).any(axis=-1)


def build_batch(group, config) -> dict:
  """Host arrays of one DPO step from a `rollout.Group`: only the members
  some pair uses are kept (`compact`)."""
  pref = config.preference
  pairs = group_pairs(group, config)
  # One member count for the whole run, so the step compiles once: the two
  # members of a best-vs-worst (or anchor-vs-worst) pair, else all of them.
  two = (pref.pairs in ("best_vs_worst", "anchor_as_chosen")
         and config.pu.mode != "nnpu")
  return compact(dict(prompt_tokens=group.prompt_tokens,
                      prompt_mask=group.prompt_mask, members=group.members,
                      member_mask=group.member_mask,
                      chosen=np.asarray(pairs.chosen),
                      rejected=np.asarray(pairs.rejected),
                      pair_mask=np.asarray(pairs.mask), **group.images()),
                 min_members=2 if two else group.members.shape[1])


def compact(batch: dict, *, len_multiple: int = 16,
            min_members: int = 1) -> dict:
  """The batch with only the members that a present pair uses.

  Best-vs-worst uses 2 of the K + 1 members of a prompt; the others would be
  scored by the policy and the reference for nothing. Kept members move to
  the front of each prompt's row in index order, [B, M, T] -> [B, U, T'],
  and chosen/rejected are renumbered; the loss, its gradient and the
  metrics are unchanged (absent pairs point at slot 0 and stay masked).

  U is the most members a prompt uses, rounded up to a power of two, at
  least `min_members`, at most M; T' the longest kept member rounded up to
  `len_multiple` (at most T): few distinct shapes, so few compiles. Dropped columns are padding of
  every kept member and come after all of their tokens, so no kept token's
  log-prob depends on them.

  Args:
    batch: `build_batch`'s keys with members i32[B, M, T], member_mask
      bool[B, M, T], chosen / rejected i32[B, N], pair_mask bool[B, N].

  Returns:
    the same keys, members and member_mask [B, U, T'], chosen / rejected
    indices into U.
  """
  members, mmask = batch["members"], batch["member_mask"]
  chosen, rejected = batch["chosen"], batch["rejected"]
  pmask = batch["pair_mask"].astype(bool)
  b, m, t = members.shape
  used = np.zeros((b, m), bool)
  rows = np.broadcast_to(np.arange(b)[:, None], chosen.shape)
  used[rows[pmask], chosen[pmask]] = True
  used[rows[pmask], rejected[pmask]] = True
  most = int(used.sum(-1).max(initial=0))
  u = min(m, max(min_members, 1 << max(most - 1, 0).bit_length()))
  new_members = np.zeros((b, u, t), members.dtype)
  new_mask = np.zeros((b, u, t), bool)
  slot = np.zeros((b, m), np.int32)  # old index -> new (unused: 0)
  for i in range(b):
    keep = np.flatnonzero(used[i])
    slot[i, keep] = np.arange(len(keep))
    new_members[i, :len(keep)] = members[i, keep]
    new_mask[i, :len(keep)] = mmask[i, keep]
  cols = np.flatnonzero(new_mask.any(axis=(0, 1)))
  last = int(cols[-1]) + 1 if len(cols) else 1
  t_new = min(t, -(-last // len_multiple) * len_multiple)
  remap = lambda idx: np.where(pmask, np.take_along_axis(slot, idx, -1), 0)
  return dict(batch, members=new_members[..., :t_new],
              member_mask=new_mask[..., :t_new],
              chosen=remap(chosen).astype(np.int32),
              rejected=remap(rejected).astype(np.int32))


def _seq_logps(model, batch, vocab_chunk):
  lp = scoring.response_logps(model, batch["prompt_tokens"],
                              batch["prompt_mask"], batch["members"],
                              batch["member_mask"], vocab_chunk=vocab_chunk,
                              pixel_values=batch.get("pixel_values"),
                              pixel_mask=batch.get("pixel_mask"))
  return lp.sum(-1)  # [B, U]


def train_step(state: state_lib.TrainState, ref_params, batch: dict,
               nan_at_step=-1, *, beta: float, loss_type: str,
               label_smoothing: float, reduce: str, schedule,
               grad_accum: int = 1, micro_batches: int = 1,
               vocab_chunk: int | None = None, pu_mode: str = "gate",
               prior: float = 0.5):
  """One DPO update on the pairs of `batch`. Pure; jit it.

  The reference's sequence log-probs are computed here under stop_gradient
  from `ref_params` (an argument, so it is not baked into the graph), per
  micro-batch when `micro_batches` > 1 (`state.grad_step`). pu_mode "nnpu":
  `losses.nnpu` on the pairs' chosen (the anchor, once a prompt) and
  rejected (the candidates) instead of DPO, weighed per prompt.
  """
  def loss_fn(params, mb):
    pairs = preferences.Pairs(mb["chosen"], mb["rejected"], mb["pair_mask"])
    ref = jax.lax.stop_gradient(_seq_logps(state.model(ref_params), mb,
                                           vocab_chunk))
    ref_c, ref_r = preferences.gather_pairs(ref, pairs)
    pol = _seq_logps(state.model(params), mb, vocab_chunk)
    pol_c, pol_r = preferences.gather_pairs(pol, pairs)
    if pu_mode == "nnpu":
      loss, metrics = losses.nnpu(
          pol_c[:, 0], ref_c[:, 0], jnp.any(pairs.mask, -1), pol_r, ref_r,
          pairs.mask, beta=beta, prior=prior)
      return state_lib.inject_nan(loss, state.step, nan_at_step), metrics
    loss, metrics = losses.dpo(pol_c, pol_r, ref_c, ref_r, beta=beta,
                               loss_type=loss_type,
                               label_smoothing=label_smoothing,
                               pair_mask=pairs.mask, reduce=reduce)
    return state_lib.inject_nan(loss, state.step, nan_at_step), metrics

  return state_lib.grad_step(
      state, loss_fn, batch, schedule=schedule, grad_accum=grad_accum,
      micro_batches=micro_batches,
      weight_fn=lambda mb: losses.dpo_weight(
          mb["pair_mask"], "prompts" if pu_mode == "nnpu" else reduce))


def step_kwargs(config) -> dict:
  d = config.loss.dpo
  return dict(beta=d.beta, loss_type=d.loss_type,
              label_smoothing=d.label_smoothing, reduce=d.reduce,
              pu_mode=config.pu.mode, prior=config.pu.prior)
