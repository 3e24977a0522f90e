"""Training: `train_and_evaluate(config, workdir)`, readable top to bottom.

Sections: mesh and models -> input pipeline -> train state (`state.create_train_state`: sharded, abstract)
-> update step (AOT compiled) -> checkpoint restore -> train loop (metrics, samples, checkpoints,
SIGTERM, NaN guard) -> export. The state, the step and the parameter selection live in `state.py`.

The objective is `config.train.objective`, a key of `losses.LOSSES` (diffusion, vae, video_vae, clip,
interpolation, upscaler).
Which parameters train is `config.train.trainable`: regexes over paths such as
`unet/down_blocks_0/attentions_0/transformer_blocks_0/temporal_attn/to_q/kernel`.
"""

import logging
import signal
import time
from typing import Any, Callable, Dict, Optional

from clu import metric_writers, periodic_actions
from etils import epath
from flax import traverse_util
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np

from magicvideo_jax import context as context_lib
from magicvideo_jax import losses
from magicvideo_jax import models as models_lib
from magicvideo_jax import sharding as sharding_lib
from magicvideo_jax import tokenizer as tok_lib
from magicvideo_jax import video_io
from magicvideo_jax.data import input_pipeline
from magicvideo_jax.sampling import pipeline as pipeline_lib
from magicvideo_jax.tools import encode_latents as latents_dataset
from magicvideo_jax.training import evaluation
from magicvideo_jax.training import state as state_lib
from magicvideo_jax.training import workdir as workdir_lib
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax.weights import surgery



# ----------------------------------------------------------------------------------------------------
# Input pipeline.


DEVICE_KEYS = ('video', 'latents', 'latent_mean', 'latent_std', 'input_ids', 'fps', 'frame_mask',
               'image_input_ids')


def make_iterator(config: ml_collections.ConfigDict, tokenizer):
  """This process's slice of the training stream (`config.data`)."""
  if jax.process_count() > 1 and config.data.get('prepare', False):
    # One process builds a missing (generated) dataset; the others wait, then read it.
    if jax.process_index() == 0:
      input_pipeline.load_source(config.data.dataset, data_dir=config.data.get('data_dir'),
                                 split=config.data.get('split', 'train'), prepare=True)
    multihost_utils.sync_global_devices('dataset prepared')
  return input_pipeline.create_iterator(
      config.data, tokenize_fn=tokenizer, process_index=jax.process_index(),
      process_count=jax.process_count())


def device_batch(batch: Dict[str, Any]) -> Dict[str, np.ndarray]:
  """The arrays of a host batch that the step consumes (captions and indices stay on the host)."""
  return {k: v for k, v in batch.items() if k in DEVICE_KEYS}


def build_tokenizer(config: ml_collections.ConfigDict):
  """The tokenizer named by `config.tokenizer`."""
  tc = config.tokenizer
  max_length = config.model.text_encoder.max_position_embeddings
  if tc.kind == 'clip':
    if not tc.path:
      raise ValueError('config.tokenizer.kind="clip" needs config.tokenizer.path (a tokenizer folder)')
    return tok_lib.CLIPTokenizer(tc.path, max_length)
  if tc.kind == 'words':
    if tc.get('path'):
      return tok_lib.WordTokenizer.load(tc.path)
    return tok_lib.WordTokenizer(list(tc.words), max_length)
  raise ValueError(f'config.tokenizer.kind={tc.kind!r}; valid: "clip", "words"')


# ----------------------------------------------------------------------------------------------------
# The program.


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step (single-process runs only).

  On several processes the handler would replace JAX's preemption notifier, and each host would
  stop at its own step; there the coordination service's sync point decides
  (`CheckpointManager.reached_preemption`), so every host saves the same step.
  """

  def __init__(self, enabled: bool = True):
    self.requested = False
    self.enabled = enabled
    self._previous = None

  def __enter__(self):
    if not self.enabled:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. a notebook worker): no handler.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and exiting.')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _lock_workdir(workdir: epath.Path) -> workdir_lib.WorkdirLock:
  """Process 0 locks the workdir; every process learns whether it could (no host waits alone)."""
  lock = workdir_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0)
  error = None
  try:
    lock.acquire()
  except workdir_lib.WorkdirLockedError as e:
    error = e
  if jax.process_count() > 1:
    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      error = workdir_lib.WorkdirLockedError(f'{workdir} is in use by another run (see its '
                                             f'{workdir_lib.LOCK_FILE} file)')
  if error is not None:
    raise error
  return lock


def _write_config(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
  """The run's whole config as JSON in the workdir (process 0), and one line about it in the log."""
  path = workdir / 'config.json'
  if jax.process_index() == 0:
    path.write_text(ckpt_lib.config_to_json(config))
  tc = config.train
  logging.info('config: %s (%d keys); objective %s, %d steps, global batch %d, lr %g', path,
               len(_flat_config(config)), tc.objective, tc.num_steps, config.data.global_batch_size,
               tc.learning_rate)


def _make_writer(workdir: epath.Path):
  """(writer, hparams writer): metrics to the log and TensorBoard; hyperparameters to TensorBoard only
  (the log line would be the whole config)."""
  if jax.process_index() > 0:
    writer = metric_writers.LoggingWriter()
    return writer, None
  summary = metric_writers.AsyncWriter(metric_writers.SummaryWriter(str(workdir)))
  return metric_writers.MultiWriter([metric_writers.LoggingWriter(), summary]), summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: Any) -> state_lib.TrainState:
  """Trains per `config`, checkpointing into and resuming from `workdir`. Returns the final state.

  `workdir` may be a local path or a URL that etils.epath and Orbax read (gs://...). One run holds it
  at a time (`training/workdir.py`).
  """
  workdir = ckpt_lib.as_path(workdir)  # URLs (gs://...) kept as they are.
  workdir.mkdir(parents=True, exist_ok=True)
  config = context_lib.resolve_derived(config)
  lock = _lock_workdir(workdir)
  try:
    return _train(config, workdir)
  finally:
    lock.release()


def _train(config: ml_collections.ConfigDict, workdir: epath.Path) -> state_lib.TrainState:
  tc = config.train

  # ---------------------------------------------------------------------------------- mesh, models
  mesh = sharding_lib.create_mesh(config.mesh)
  logging.info('mesh %s over %d devices, %d processes', dict(mesh.shape), jax.device_count(),
               jax.process_count())
  modules = models_lib.build_models(config.model)
  tokenizer = build_tokenizer(config)
  if tc.objective == 'diffusion':
    logging.info('U-Net context: %s', context_lib.describe(config.model))
  _write_config(workdir, config)

  # ---------------------------------------------------------------------------------- input pipeline
  batch_size = config.data.global_batch_size
  if batch_size % (tc.grad_accum_steps * mesh.size) or batch_size % jax.process_count():
    raise ValueError(
        f'config.data.global_batch_size={batch_size} must divide by config.train.grad_accum_steps='
        f'{tc.grad_accum_steps} times the {mesh.size} devices of the mesh')
  train_iter = make_iterator(config, tokenizer)
  latents_metadata = latents_dataset_metadata(config)

  # ---------------------------------------------------------------------------------- train state
  # Abstract and sharded (state.create_train_state, also what flops.py counts); allocated below.
  setup = state_lib.create_train_state(config, mesh, modules=modules,
                                       batch_struct=_batch_struct(config, train_iter, mesh))

  # ---------------------------------------------------------------------------------- checkpoint load
  # Before compiling: a checkpoint of another model fails at once.
  manager = ckpt_lib.make_manager(workdir, keep=tc.keep_checkpoints,
                                  save_interval_steps=tc.checkpoint_every,
                                  async_save=tc.async_checkpointing)
  restored = ckpt_lib.restore_latest(manager, setup.abstract_state, config,
                                     allow_config_change=tc.allow_config_change)
  if restored is not None:
    latest, state, data_state = restored
    logging.info('resuming from %s step %d', manager.directory, latest)
    train_iter.set_state(data_state)
  else:
    state = setup.init_fn(setup.init_key)
    if tc.init_from or context_lib.uses_clip_embedding(config.model):
      params = multihost_utils.process_allgather(state.params, tiled=True)
      if tc.init_from:
        params = surgery.load_init_checkpoint(params, tc.init_from, tc.init_from_include)
      params = context_lib.load_frozen_encoder(params, config)  # conditioning.clip_dir, if set.
      params = jax.device_put(params, setup.param_shardings)
      trainable, _ = state_lib.split_params(params, setup.mask)
      # The EMA starts equal to the params but must not share their (donated) buffers.
      state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, trainable))
  start_step = int(jax.device_get(state.step))
  if latents_metadata:
    check_latents_vae(config, latents_metadata, modules['vae'], state.params['vae'])

  # ---------------------------------------------------------------------------------- update step
  compiled_step, compile_seconds = setup.compile()
  step_flops = _flops(compiled_step)
  logging.info('train step compiled in %.1f s; %.3g FLOPs per step per device', compile_seconds,
               step_flops or float('nan'))

  # ---------------------------------------------------------------------------------- train loop
  writer, hparams_writer = _make_writer(workdir)
  if start_step == 0 and hparams_writer is not None:
    hparams_writer.write_hparams(_flat_config(config))
  hooks = [periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=writer,
                                           every_steps=tc.log_every)]
  if tc.profile_every and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=str(workdir), num_profile_steps=tc.profile_num_steps,
                                          every_steps=tc.profile_every))
  sampler = _make_sample_hook(config, modules, tokenizer, mesh, workdir) if tc.sample_every else None
  evaluator, best_saver = None, None
  if evaluation.enabled(config):
    evaluation.validate(config)
    evaluator = evaluation.Evaluator(config, setup, mesh, tokenizer, make_iterator, device_batch)
    names = evaluator.metric_names(state)
    if config.eval.best_metric not in names:
      raise ValueError(f'config.eval.best_metric={config.eval.best_metric!r}; the evaluation writes '
                       f'{", ".join(names)}')
    best_saver = _Saver(ckpt_lib.make_best_manager(workdir, config.eval.best_metric,
                                                   config.eval.best_mode), config)
  writer.write_scalars(start_step, dict(compile_seconds=compile_seconds))
  saver = _Saver(manager, config)
  step = start_step
  sums, count = None, 0  # Metrics summed on device over the logging interval.
  last_time, last_step = time.time(), step
  with _Preemption(enabled=jax.process_count() == 1) as preemption:
    while step < tc.num_steps:
      batch = sharding_lib.to_global_batch(device_batch(next(train_iter)), mesh)
      state, metrics = compiled_step(state, batch)
      step += 1
      for hook in hooks:
        hook(step)
      sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
      count += 1
      preempted = preemption.requested or manager.reached_preemption(step)
      force_save = preempted or step == tc.num_steps
      if step % tc.log_every == 0 or step == tc.num_steps:
        means = {k: float(v) / count for k, v in jax.device_get(sums).items()}
        means['learning_rate'] = float(jax.device_get(metrics['learning_rate']))
        _check_loss(means['loss'], step, count, saver)
        elapsed = time.time() - last_time
        rate = (step - last_step) / max(elapsed, 1e-9)
        if step_flops:
          means['tflops_per_device'] = step_flops * rate / 1e12
        writer.write_scalars(step, means)
        sums, count = None, 0
        last_time, last_step = time.time(), step
      elif force_save or manager.should_save(step):  # No state of a non-finite loss is saved.
        _check_loss(float(jax.device_get(sums['loss'])) / count, step, count, saver)
      saver.save(step, state, train_iter.get_state(), force=force_save)
      if sampler is not None and step % tc.sample_every == 0:
        sampler(step, state)
      if evaluator is not None and (step % config.eval.every_steps == 0 or step == tc.num_steps):
        _evaluate(evaluator, best_saver, writer, step, state, train_iter.get_state())
      if preempted:
        saver.finish()
        logging.warning('stopped at step %d after a preemption notice; the checkpoint is saved.',
                        step)
        writer.flush()
        return state
  saver.finish()
  if best_saver is not None:
    best_saver.finish()
  writer.flush()

  # ---------------------------------------------------------------------------------- export
  if tc.export:
    export_dir = workdir / ckpt_lib.EXPORT_DIR
    params = state_lib.merge_ema(state.params, state.ema_params) if tc.export_ema else state.params
    export_config = _export_config(config)
    if tc.objective == 'vae':
      scale = latent_scaling_factor(modules['vae'], params['vae'], train_iter, mesh)
      logging.info('latent scaling factor (1 / std of the latents): %.5f', scale)
      export_config.model.vae.scaling_factor = scale
    ckpt_lib.save_pretrained(export_dir, export_config,
                             multihost_utils.process_allgather(params, tiled=True), tokenizer)
    logging.info('exported %s', export_dir)
  return state


def _check_loss(loss: float, step: int, count: int, saver: '_Saver') -> None:
  if not np.isfinite(loss):
    saver.finish()
    steps = f'step {step}' if count == 1 else f'steps {step - count + 1}-{step}'
    raise FloatingPointError(
        f'loss is {loss} at step {step} (the mean over {steps}): training stopped; the last good '
        f'checkpoint is {saver.last_good()}. Lower config.train.learning_rate or check the input data.')


def _evaluate(evaluator, best_saver, writer, step: int, state, data_state) -> None:
  """Writes the evaluation's metrics; saves the state as the best one when they are finite (Orbax
  keeps it only if its metric beats the kept one)."""
  metrics = evaluator(state)
  writer.write_scalars(step, metrics)
  logging.info('evaluation at step %d: %s', step,
               ', '.join(f'{k}={v:.5g}' for k, v in sorted(metrics.items())))
  if evaluation.is_finite(metrics):
    best_saver.save(step, state, data_state, force=True, metrics=metrics)


class _Saver:
  """Checkpoint saves that stop the run on failure (a full disk) and log when async ones finish."""

  def __init__(self, manager, config):
    self.manager, self.config = manager, config
    self.pending: Optional[int] = None

  def last_good(self) -> str:
    step = self.manager.latest_step()
    return 'none (no checkpoint was written)' if step is None else f'step {step}'

  def _check_pending(self) -> None:
    if self.pending is not None and not self.manager.is_saving_in_progress():
      logging.info('checkpoint step %d saved', self.pending)
      self.pending = None

  def save(self, step: int, state, data_state, force: bool,
           metrics: Optional[Dict[str, float]] = None) -> None:
    try:
      self._check_pending()
      if ckpt_lib.save_train_state(self.manager, step, state, data_state, self.config, force=force,
                                   metrics=metrics):
        if self.pending is not None:  # Orbax finished it before starting this one.
          logging.info('checkpoint step %d saved', self.pending)
        self.pending = step
        if not self.config.train.async_checkpointing:
          self._check_pending()
    except ckpt_lib.NonFiniteStateError as e:
      raise FloatingPointError(f'{e}; training stopped. Lower config.train.learning_rate or check '
                               'the input data.') from None
    except (OSError, ValueError, RuntimeError) as e:
      raise ckpt_lib.CheckpointError(
          f'saving the checkpoint of step {step} failed ({type(e).__name__}: '
          f'{" ".join(str(e).split())[:200]}); training stopped; the last good checkpoint is '
          f'{self.last_good()}') from None

  def finish(self) -> None:
    try:
      self.manager.wait_until_finished()
    except (OSError, ValueError, RuntimeError) as e:
      raise ckpt_lib.CheckpointError(
          f'a checkpoint save failed ({type(e).__name__}: {" ".join(str(e).split())[:200]}); the '
          f'last good checkpoint is {self.last_good()}') from None
    self._check_pending()


def latent_scaling_factor(vae, vae_params, train_iter, mesh: Mesh, num_batches: int = 4) -> float:
  """1 / std of posterior samples over a few batches: latents of unit variance, as SD's 0.18215."""
  encode = jax.jit(lambda p, x, k: losses.encode_latents(vae, p, x, jax.random.split(k, x.shape[0]), 1.0))
  values = []
  for i in range(num_batches):
    video = sharding_lib.to_global_batch(device_batch(next(train_iter)), mesh)['video']
    values.append(sharding_lib.to_host(encode(vae_params, video, jax.random.key(i))))
  return float(1.0 / np.std(np.concatenate([v.ravel() for v in values])))


def _export_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The sections a pretrained folder keeps."""
  keep = ('model', 'diffusion', 'sampling', 'tokenizer', 'lora', 'interpolation', 'image_to_video',
          'upscaler')
  out = ml_collections.ConfigDict({k: config[k].to_dict() for k in keep if k in config})
  out.data = dict(num_frames=config.data.num_frames, resolution=config.data.resolution,
                  fps=config.data.fps)
  if 'path' in out.tokenizer:
    out.tokenizer.path = ''
  return out


# Objectives whose input is the frozen VAE's posterior, which a precomputed-latents dataset stores.
LATENT_OBJECTIVES = ('diffusion', 'cmd_autoencoder', 'cmd_content', 'cmd_motion')


def latents_dataset_metadata(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """Metadata of a precomputed-latents dataset ({} unless config.data.precomputed_latents)."""
  if not config.data.get('precomputed_latents', False):
    return {}
  if config.train.objective not in LATENT_OBJECTIVES:
    raise ValueError(f'config.train.objective={config.train.objective!r} trains on pixels; '
                     'config.data.precomputed_latents=True only feeds the objectives '
                     f'{LATENT_OBJECTIVES}.')
  directory = input_pipeline.prepared_directory(config.data.dataset, config.data.get('data_dir'))
  metadata = latents_dataset.read_metadata(directory) if directory else {}
  if 'vae_probe' not in metadata:
    raise ValueError(f'config.data.dataset={config.data.dataset!r} carries no VAE fingerprint: '
                     'build it with `python -m magicvideo_jax.tools.encode_latents`.')
  if int(metadata['resolution']) != int(config.data.resolution):
    raise ValueError(f'The latents were encoded at {metadata["resolution"]}px, '
                     f'config.data.resolution={config.data.resolution}.')
  return metadata


def check_latents_vae(config: ml_collections.ConfigDict, metadata: Dict[str, Any], vae,
                      vae_params) -> None:
  """Refuses precomputed latents that another VAE produced (their fingerprints differ)."""
  latents_dataset.check_probe(metadata['vae_probe'],
                              latents_dataset.vae_probe(vae, vae_params, config.data.resolution),
                              f'config.data.dataset={config.data.dataset!r}')


def _batch_struct(config: ml_collections.ConfigDict, train_iter, mesh: Mesh) -> Dict[str, Any]:
  """Global ShapeDtypeStructs of a batch, from this process's first batch (the stream is unchanged)."""
  local = device_batch(train_iter.make_batch(0, 0))
  return {k: jax.ShapeDtypeStruct((config.data.global_batch_size,) + v.shape[1:], v.dtype,
                                  sharding=sharding_lib.batch_sharding(mesh, v.ndim))
          for k, v in local.items()}


def _flops(compiled) -> Optional[float]:
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get('flops', 0.0)) or None
  except Exception:  # pylint: disable=broad-except
    return None


def _flat_config(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def _make_sample_hook(config, modules, tokenizer, mesh, workdir) -> Optional[Callable]:
  """Writes a GIF of a few prompts sampled with the EMA params every `config.train.sample_every` steps."""
  if config.train.objective != 'diffusion':
    return None
  prompts = list(config.train.sample_prompts)
  out_dir = epath.Path(workdir) / 'samples'

  pipes = []  # Built once: later calls reuse its compiled sampler with new params.

  def hook(step: int, state: state_lib.TrainState) -> None:
    params = state_lib.merge_ema(state.params, state.ema_params)
    if not pipes:
      pipes.append(pipeline_lib.MagicVideoPipeline(_export_config(config), params, tokenizer,
                                                   modules=modules, mesh=mesh))
    pipe = pipes[0]
    pipe.params = jax.device_put(params, pipe.params_sharding)
    videos = pipe(prompts, seed=0)  # The exported config's sampling defaults, as `sample` uses.
    if jax.process_index() == 0:
      out_dir.mkdir(parents=True, exist_ok=True)
      video_io.write_video(str(out_dir / f'step_{step:07d}.gif'), video_io.tile_videos(videos),
                           fps=config.data.fps)

  return hook
