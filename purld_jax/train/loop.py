"""The host side of a training loop, shared by every stage.

  loop = Loop(stage="sft", total_steps=100, start_step=state_step, ckpt=ckpt,
              writer=writer, nan_policy="skip", progress=True)
  for step in range(start, total):
    state, metrics = train_step(state, batch)       # dispatched, not waited
    loop.record(step + 1, metrics, tokens=n_tokens, host={"sample_s": ...})
    loop.maybe_save(step + 1, state.arrays(), data_iter=it, config=cfg)
  loop.finish(total, state.arrays(), data_iter=it, config=cfg)

`Stage` wraps a Loop with what every stage sets up around it (optimizer,
checkpoints with automatic resume, metrics writer) from the config; the
state lives on the mesh with the shardings of `sharded.state_shardings`
(restored straight into them). Only process 0 writes metrics, TensorBoard
and the progress bar; every process runs the steps and the checkpoints
(orbax writes each process's shards).

`record` keeps a step's device metrics pending and reads the previous step's
(one step late), so the host never waits for the step it just dispatched.
Reading a step: the NaN policy (`state.check_finite`: 'stop' raises naming
the step and the quantity), one metrics.jsonl / TensorBoard record, the
progress bar (step, loss, tokens/s, ETA).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Mapping

import jax
import tqdm

from purld_jax import checkpoint as checkpoint_lib
from purld_jax import hostmem
from purld_jax import metrics as metrics_lib
from purld_jax import preemption
from purld_jax import sharded
from purld_jax.train import state as state_lib


def live_bytes() -> int:
  """Bytes of the device buffers behind this process's live JAX arrays, each
  buffer once: `jax.device_put` onto an array's own sharding returns a new
  Array on the same buffer, so summing `nbytes` over `jax.live_arrays()`
  counted stage 2's reference twice (5 copies of every weight where the
  policy, mu, nu and the reference hold 4)."""
  seen, total = set(), 0
  for x in jax.live_arrays():
    for shard in x.addressable_shards:
      d = shard.data
      try:
        key = (d.device, d.unsafe_buffer_pointer())
      except Exception:  # a backend without raw pointers: count it
        key = id(d)
      if key not in seen:
        seen.add(key)
        total += d.nbytes
  return total


def memory_now() -> dict[str, float]:
  """This process's peak RSS so far and the bytes of its live JAX arrays
  (params, optimizer state, reference, caches: what the state holds; the
  rest of RSS is XLA's temporaries, compiled code and the runtime), MB."""
  peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
  return dict(peak_rss_mb=peak_kb / 1024, live_arrays_mb=live_bytes() / 2**20)


class Loop:
  """Progress, metrics one step late, NaN policy and checkpoint cadence."""

  def __init__(self, *, stage: str, total_steps: int, start_step: int,
               ckpt: checkpoint_lib.Checkpointer | None,
               writer: metrics_lib.Writer | None, nan_policy: str,
               log_every: int = 1, progress: bool = True,
               sleep_s: float = 0.0, pause_after_step: int = -1):
    if nan_policy not in state_lib.NAN_POLICIES:
      raise ValueError(f"nan_policy {nan_policy!r} not in "
                       f"{state_lib.NAN_POLICIES}")
    self.stage, self.ckpt, self.writer = stage, ckpt, writer
    self.nan_policy, self.log_every = nan_policy, max(1, log_every)
    self.sleep_s, self.pause_after_step = sleep_s, pause_after_step
    self.skipped = 0            # updates skipped since this process started
    self.last: dict = {}        # the last metrics read (host floats)
    self._pending = None
    self._first = True          # the next record is this process's first
    self._t_last = time.perf_counter()
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step,
                          desc=stage, unit="step", disable=not progress,
                          dynamic_ncols=True)

  def compiling(self) -> None:
    """Says on the progress bar that the first step compiles (for minutes
    on a CPU, at 0 % otherwise); call it just before the stage's first
    step. The next `record` shows how long that step took."""
    if self._bar.n < (self._bar.total or 0):
      self._bar.set_postfix_str("compiling the first step ...", refresh=True)

  def record(self, step: int, metrics: Mapping, *, tokens: int = 0,
             host: Mapping[str, float] | None = None) -> dict | None:
    """Queues step `step`'s metrics; reads and returns the previous step's.

    Args:
      step: the step these metrics belong to (state.step after it).
      metrics: device scalars from the step function.
      tokens: tokens the step processed (throughput).
      host: host-side floats of the step (e.g. phase timings).
    """
    # The step's wall time: from the previous record to the end of this
    # step's computation. Waiting for it here (not reading it: the values
    # are still read one step late) keeps an asynchronously dispatched step
    # from being timed by its dispatch alone, which made the progress bar's
    # tok/s jump between tens and thousands; it costs only the overlap of
    # the next batch's host-side assembly with this step.
    jax.block_until_ready(metrics)
    hostmem.release()  # the step's temporaries, freed: back to the system
    now = time.perf_counter()
    elapsed, self._t_last = now - self._t_last, now
    if self._first:  # shown until this step's metrics are read
      self._first = False
      self._bar.set_postfix_str(f"first step took {elapsed:.0f}s (compiling "
                                "included)", refresh=True)
    previous = self._flush()
    self._pending = (step, metrics, tokens, dict(host or {}), elapsed)
    if self.sleep_s:
      time.sleep(self.sleep_s)
    return previous

  def _flush(self) -> dict | None:
    if self._pending is None:
      return None
    step, metrics, tokens, host, elapsed = self._pending
    self._pending = None
    values = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
    values.update(host)
    values["step_s"] = elapsed
    values.update(memory_now())
    if tokens:
      values["tokens_per_s"] = tokens / max(elapsed, 1e-9)
    self.skipped += int(values.get("skipped", 0.0))
    self.last = values
    post = {"loss": f"{values.get('loss', float('nan')):.4g}"}
    if tokens:
      post["tok/s"] = f"{values['tokens_per_s']:.0f}"
    if self.skipped:
      post["skipped"] = self.skipped
    self._bar.set_postfix(post, refresh=False)
    self._bar.update(1)  # drawn with this step's numbers
    if self.writer is not None and (step % self.log_every == 0
                                    or values.get("skipped")):
      self.writer.write(step, values)
    state_lib.check_finite(values, step=step, policy=self.nan_policy)
    return values

  def maybe_save(self, step: int, arrays, *, data_iter=None,
                 config: dict | None = None) -> bool:
    """Saves when `step` is due for a checkpoint, after reading the pending
    metrics (so every checkpointed step has its metrics record, and a stop
    under the NaN policy comes before the save). After a SIGTERM (any
    process's: `preemption.stop_agreed`) the step is saved whether due or
    not and `preemption.Preempted` is raised once the write is done."""
    saved = False
    stop = preemption.stop_agreed()
    if self.ckpt is not None and (stop or self.ckpt.due(step)):
      self._flush()
      saved = self.ckpt.save(step, arrays, data_iter=data_iter, config=config,
                             force=True)
    if step == self.pause_after_step:  # the kill tests' hook
      if self.ckpt is not None:
        self.ckpt.wait()
      print(f"[{self.stage}] paused after step {step} "
            "(debug.pause_after_step)", file=sys.stderr, flush=True)
      while not preemption.requested():  # only a signal ends the pause
        time.sleep(0.1)
      stop = True
      if self.ckpt is not None:  # a step that was not due: saved now
        self._flush()
        saved = self.ckpt.save(step, arrays, data_iter=data_iter,
                               config=config, force=True) or saved
    if stop:
      directory = None
      if self.ckpt is not None:
        self.ckpt.wait()
        directory = self.ckpt.directory
      self._flush()
      self.close()
      raise preemption.Preempted(self.stage, step, directory)
    return saved

  def finish(self, step: int, arrays, *, data_iter=None,
             config: dict | None = None) -> dict | None:
    """Reads the last pending metrics, saves step `step` (forced) and waits
    for the writes; returns the last metrics."""
    last = self._flush()
    if self.ckpt is not None:
      self.ckpt.save(step, arrays, data_iter=data_iter, config=config,
                     force=True)
      self.ckpt.wait()
    self.close()
    return last

  def close(self) -> None:
    self._bar.close()


class Stage:
  """Everything a stage's loop needs around its step function, from the
  config: optimizer, checkpoints (resumed automatically), metrics writer,
  `Loop`. A context manager that closes them all (pending saves written).

    with loop.Stage(config, workdir, "sft", total_steps=100,
                    learning_rate=1e-5, warmup_frac=0.1, graphdef=g,
                    param_shapes=shapes, param_sh=param_sh,
                    init_params=load_params, data_iter=it,
                    teacher_label=teacher.label) as stage:
      state = stage.state        # restored or initialised, on stage.state_sh
      for step in range(stage.start, 100):
        state, metrics = step_fn(state, batch)  # stage.schedule is its lr
        stage.step_done(step + 1, state, metrics, tokens=n)
      stage.finish(state)

  Checkpoints go to <workdir>/ckpt/<name>/, metrics to <workdir>/metrics.jsonl
  and <workdir>/tb/<name>/. The optimizer is `opt.*` with this stage's
  learning rate, warmup and length; `init_params()` (host arrays, the same
  on every process) runs only when there is no checkpoint to resume.
  `param_sh` are the params' NamedShardings (`sharding.param_shardings`);
  `state_sh` the state's (`sharded.state_shardings`). With LoRA the params
  (`param_shapes`, `param_sh`, `init_params`) are the adapters' and
  `frozen` the base (device arrays on `frozen_sh`): it joins the state,
  never the checkpoint, so a resume restores the adapters alone.
  """

  def __init__(self, config, workdir: str, name: str, *, total_steps: int,
               learning_rate: float, warmup_frac: float, graphdef,
               param_shapes, param_sh, init_params, data_iter,
               teacher_label: str = "", updates_per_step: int = 1,
               frozen=None, frozen_sh=None):
    self.name, self.total_steps, self.data_iter = name, total_steps, data_iter
    self.config_dict = config.to_dict()
    # The schedule spans every optimizer update of the stage (a GRPO step
    # makes `updates_per_step` of them): state_lib.optimizer_from_config.
    self.tx, self.schedule = state_lib.optimizer_from_config(
        config.opt, learning_rate=learning_rate, warmup_frac=warmup_frac,
        total_steps=total_steps, updates_per_step=updates_per_step)
    self._graphdef, self._shapes = graphdef, param_shapes
    self._init_params, self._teacher_label = init_params, teacher_label
    self._workdir, self._config = workdir, config
    self._frozen = frozen
    self.rng = jax.random.PRNGKey(config.seed)
    self.ckpt = self.writer = self.loop = self.state = None
    self.start = 0
    self._abstract = jax.eval_shape(
        lambda p: state_lib.TrainState.create(graphdef, p, self.tx,
                                              rng=self.rng), param_shapes)
    self.param_sh = param_sh
    self.state_sh = sharded.state_shardings(self._abstract, param_sh,
                                            frozen_sh)

  def _init_arrays(self) -> dict:
    """The initial state's arrays, made on their shardings."""
    params = sharded.put(self._init_params(), self.param_sh)
    create = lambda p: state_lib.TrainState.create(
        self._graphdef, p, self.tx, rng=self.rng).arrays()
    return jax.jit(create, out_shardings=self.state_sh.arrays())(params)

  def __enter__(self) -> Stage:
    c = self._config
    self.ckpt = checkpoint_lib.Checkpointer(
        f"{self._workdir}/ckpt/{self.name}", every_steps=c.ckpt.every_steps,
        keep=c.ckpt.keep, async_save=c.ckpt.async_save,
        every_minutes=c.ckpt.every_minutes)
    try:
      abstract = checkpoint_lib.abstract_like(self._abstract.arrays(),
                                              self.state_sh.arrays())
      arrays, self.start = checkpoint_lib.restore_or_init(
          self.ckpt, abstract, self._init_arrays, data_iter=self.data_iter,
          config=self.config_dict)
      self.state = state_lib.TrainState(graphdef=self._graphdef, tx=self.tx,
                                        frozen=self._frozen, **arrays)
      if self.start:
        print(f"[{self.name}] resumed from step {self.start}",
              file=sys.stderr)
      first = jax.process_index() == 0
      if first:
        self.writer = metrics_lib.Writer(
            self._workdir, stage=self.name, resume_step=self.start,
            tensorboard=c.log.tensorboard)
        if self._teacher_label:
          self.writer.text("teacher", self._teacher_label)
      self.loop = Loop(stage=self.name, total_steps=self.total_steps,
                       start_step=self.start, ckpt=self.ckpt,
                       writer=self.writer, nan_policy=c.opt.nan_policy,
                       log_every=c.log.every_steps,
                       progress=c.log.progress and first,
                       sleep_s=c.debug.step_sleep_s,
                       pause_after_step=c.debug.pause_after_step)
    except BaseException:
      self.__exit__(None, None, None)
      raise
    return self

  def step_done(self, step: int, state: state_lib.TrainState, metrics, *,
                tokens: int = 0, host=None) -> None:
    """`Loop.record` (metrics read one step late) and a checkpoint if due."""
    self.loop.record(step, metrics, tokens=tokens, host=host)
    self.loop.maybe_save(step, state.arrays(), data_iter=self.data_iter,
                         config=self.config_dict)

  def finish(self, state: state_lib.TrainState) -> None:
    """Reads the last metrics, saves the final step, reports skips."""
    self.loop.finish(self.total_steps, state.arrays(),
                     data_iter=self.data_iter, config=self.config_dict)
    if self._config.ckpt.keep_finished == "last":  # what an extension needs
      self.ckpt.keep_only(self.total_steps)
    if self.loop.skipped:
      print(f"[{self.name}] {self.loop.skipped} update(s) skipped: "
            "non-finite loss or gradients (opt.nan_policy='skip')",
            file=sys.stderr)

  def __exit__(self, *exc) -> None:
    if self.loop is not None:
      self.loop.close()
    if self.ckpt is not None:
      self.ckpt.close()
    if self.writer is not None:
      self.writer.close()


def mesh_setup(config, model_cfg, *, batch_sizes: dict[str, int]):
  """(mesh, param shardings) of `config.mesh` for the model `model_cfg`.

  A batch in `batch_sizes` (config field -> size) that the mesh's data x
  fsdp devices do not divide runs replicated on them (correct, wasteful):
  said on stderr once. `main.validate` refuses that for explicit mesh
  sizes; here it can only come from an inferred (-1) one.
  """
  from purld_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.mesh_from_config(config.mesh)
  split = mesh.shape["data"] * mesh.shape["fsdp"]
  for field, size in batch_sizes.items():
    if size % split:
      print(f"[mesh] {field}={size} is not a multiple of data x fsdp = "
            f"{split} ({dict(mesh.shape)}): its batches are replicated",
            file=sys.stderr)
  return mesh, sharding.param_shardings(model_cfg, mesh)
