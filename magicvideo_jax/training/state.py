"""The train state and its step: the one construction that `train.train_and_evaluate` trains,
`magicvideo_jax.flops` counts and `benchmarks/mfu.py` times.

`create_train_state(config, mesh)` -> `TrainSetup`: models, optimizer, trainable mask, the abstract
sharded state, `init_fn` (key -> sharded state) and the jitted step (in/out shardings, state donated);
`setup.compile()` AOT-compiles the step for the batch structure (`abstract_batch(config, mesh)` unless
another is given).
"""

import contextlib
import dataclasses
import functools
import logging
import re
import time
from typing import Any, Callable, Dict, Optional, Tuple

import einops
from flax import traverse_util
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from magicvideo_jax import context as context_lib
from magicvideo_jax import diffusion
from magicvideo_jax import lora as lora_lib
from magicvideo_jax import losses
from magicvideo_jax import models as models_lib
from magicvideo_jax import sharding as sharding_lib

Params = Dict[str, Any]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Params  # {'text_encoder', 'vae', 'unet'} (and 'lora'): every parameter, frozen or not.
  opt_state: Any  # Over the trainable subset only.
  ema_params: Params  # EMA of the trainable subset (nested dict of those leaves only).


# ----------------------------------------------------------------------------------------------------
# Parameter selection.


def trainable_mask(params: Params, patterns) -> Dict[str, bool]:
  """Flat path -> bool: a path trains when one of the regexes matches it (re.search)."""
  compiled = [re.compile(p) for p in patterns]
  flat = traverse_util.flatten_dict(params, sep='/')
  return {path: any(c.search(path) for c in compiled) for path in flat}


def split_params(params: Params, mask: Dict[str, bool]) -> Tuple[Params, Params]:
  flat = traverse_util.flatten_dict(params, sep='/')
  trainable = {p: v for p, v in flat.items() if mask[p]}
  frozen = {p: v for p, v in flat.items() if not mask[p]}
  return (traverse_util.unflatten_dict(trainable, sep='/'),
          traverse_util.unflatten_dict(frozen, sep='/'))


def merge_params(*trees: Params) -> Params:
  flat = {}
  for tree in trees:
    flat.update(traverse_util.flatten_dict(tree, sep='/'))
  return traverse_util.unflatten_dict(flat, sep='/')


def merge_ema(params: Params, ema_params: Params) -> Params:
  """Full params with the trainable leaves replaced by their EMA (what sampling uses)."""
  return merge_params(params, ema_params)


# ----------------------------------------------------------------------------------------------------
# Optimizer.


def make_optimizer(config: ml_collections.ConfigDict) -> Tuple[optax.GradientTransformation, Callable]:
  tc = config.train
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tc.learning_rate, warmup_steps=tc.warmup_steps,
      decay_steps=max(tc.num_steps, tc.warmup_steps + 1), end_value=tc.learning_rate * tc.end_lr_factor)
  tx = optax.chain(
      optax.clip_by_global_norm(tc.grad_clip_norm),
      optax.adamw(schedule, b1=tc.adam_b1, b2=tc.adam_b2, eps=1e-8, weight_decay=tc.weight_decay),
  )
  return tx, schedule


# ----------------------------------------------------------------------------------------------------
# Train step.


# Every loss takes `keys`: one PRNG key per example [B], derived from (seed, step, example index), so
# noise, timesteps and posterior samples do not depend on how the batch is split (devices, hosts,
# gradient-accumulation micro-batches).


def make_train_step(config: ml_collections.ConfigDict, modules, schedule, tx, lr_schedule,
                    mask: Dict[str, bool]) -> Callable:
  """(state, batch) -> (state, metrics). Gradient accumulation over `config.train.grad_accum_steps`."""
  objective = config.train.objective
  if objective not in losses.LOSSES:
    raise ValueError(f'config.train.objective={objective!r}; valid: {sorted(losses.LOSSES)}')
  objective_fn = functools.partial(losses.LOSSES[objective], modules=modules, schedule=schedule,
                                   config=config)
  lora_scale = lora_lib.scale(config)

  def loss_fn(params, batch, keys):  # The models see their kernels with the adapters added.
    return objective_fn(lora_lib.fold(params, lora_scale), batch, keys)

  accum = config.train.grad_accum_steps
  base_key = jax.random.key(config.seed)

  def train_step(state: TrainState, batch: Dict[str, jax.Array]):
    trainable, frozen = split_params(state.params, mask)
    step_key = jax.random.fold_in(base_key, state.step)
    batch_size = jax.tree.leaves(batch)[0].shape[0]
    keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(batch_size))

    def compute(trainable, micro_batch, micro_keys):
      (loss, aux), grads = jax.value_and_grad(
          lambda t: loss_fn(merge_params(frozen, t), micro_batch, micro_keys), has_aux=True)(trainable)
      return loss, aux, grads

    if accum == 1:
      loss, aux, grads = compute(trainable, batch, keys)
    else:  # Micro-batches in a scan: activations of one micro-batch live at a time.
      micro = jax.tree.map(lambda x: einops.rearrange(x, '(a b) ... -> a b ...', a=accum),
                           (batch, keys))

      def body(carry, xs):
        carry = jax.tree.map(jnp.add, carry, compute(trainable, *xs))
        return carry, None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          compute, trainable, *jax.tree.map(lambda x: x[0], micro)))
      (loss, aux, grads), _ = jax.lax.scan(body, zeros, micro)
      loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))

    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    decay = config.train.ema_decay
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, trainable)
    new_state = state.replace(step=state.step + 1, params=merge_params(frozen, trainable),
                              opt_state=opt_state, ema_params=ema)
    metrics = dict(loss=loss, grad_norm=optax.global_norm(grads),
                   learning_rate=lr_schedule(state.step), **aux)
    return new_state, metrics

  return train_step


# ----------------------------------------------------------------------------------------------------
# Initialisation.


def dummy_inputs(config: ml_collections.ConfigDict, batch: int = 1) -> Dict[str, Any]:
  """Smallest inputs that create every parameter of the three models."""
  mc = config.model
  frames = config.data.num_frames
  res = config.data.resolution
  down = 2 ** (len(mc.vae.block_out_channels) - 1)
  latent = res // down
  return dict(
      input_ids=jnp.zeros((batch, mc.text_encoder.max_position_embeddings), jnp.int32),
      image=jnp.zeros((batch, res, res, mc.vae.in_channels), jnp.float32),
      latents=jnp.zeros((batch, frames, latent, latent, mc.unet.in_channels), jnp.float32),
      timesteps=jnp.zeros((batch,), jnp.int32),
      context=jnp.zeros((batch, mc.text_encoder.max_position_embeddings, mc.unet.cross_attention_dim),
                        jnp.float32),
      fps=jnp.ones((batch,), jnp.float32),
  )


def init_params(modules, config: ml_collections.ConfigDict, key: jax.Array) -> Params:
  """Boxed (logically partitioned) params of all the models (context.init_params adds the CLIP
  dual encoder and the embedding-to-context layer where the config has them)."""
  x = dummy_inputs(config)
  k_text, k_vae, k_unet = jax.random.split(key, 3)
  # An upscaler U-Net embeds the noise level of its low-res input as a class.
  labels = jnp.zeros((1,), jnp.int32) if config.model.unet.get('num_class_embeds') else None
  params = dict(
      text_encoder=modules['text_encoder'].init(k_text, x['input_ids'])['params'],
      vae=modules['vae'].init(k_vae, x['image'])['params'],
      unet=modules['unet'].init(k_unet, x['latents'], x['timesteps'], x['context'], fps=x['fps'],
                                class_labels=labels)['params'],
  )
  params = context_lib.init_params(modules, config, jax.random.fold_in(key, 3), params)
  if models_lib.is_cmd(config.model):
    params.update(init_cmd_params(modules, config, jax.random.fold_in(key, 5)))
  if lora_lib.enabled(config):
    params[lora_lib.KEY] = lora_lib.init(params, config, jax.random.fold_in(key, 4))
  return params


def init_cmd_params(modules, config: ml_collections.ConfigDict, key: jax.Array) -> Params:
  """Boxed params of CMD's autoencoder and motion DiT, at the clip shape of `config.data` (the
  autoencoder's learned position tables take their sizes from it)."""
  x = dummy_inputs(config)
  latents = x['latents']  # [1, L, h, w, c]
  autoencoder, dit = modules['cmd_autoencoder'], modules['motion_dit']
  k_ae, k_dit = jax.random.split(key)
  _, frames, height, width, _ = latents.shape
  p = autoencoder.patch_size
  motion = jnp.zeros((1, frames, width // p + height // p, autoencoder.motion_channels), jnp.float32)
  text = jnp.zeros((1, config.model.text_encoder.hidden_size), jnp.float32)
  ae_params = autoencoder.init(k_ae, latents)['params']
  dit_params = dit.init(k_dit, motion, x['timesteps'], latents[:, 0], text)['params']
  return dict(cmd_autoencoder=ae_params, motion_dit=dit_params)


# ----------------------------------------------------------------------------------------------------
# The batch the step consumes.


def abstract_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> Dict[str, jax.ShapeDtypeStruct]:
  """Global ShapeDtypeStructs (batch-sharded) of the device arrays `train.make_iterator` yields
  (`data/input_pipeline.py`, `train.DEVICE_KEYS`), from the config alone.

  'video' [B, F + n, R, R, 3] float32 (n = config.data.num_image_frames), or with
  config.data.precomputed_latents the stored posterior 'latent_mean', 'latent_std' [B, F, h, w, c];
  'frame_mask' [B, F + n] bool, 'fps' [B] float32, 'input_ids' [B, L] int32 (L =
  config.model.text_encoder.max_position_embeddings, what `train.build_tokenizer` pads to) and with
  n > 0 'image_input_ids' [B, n, L] int32.
  """
  dc = config.data
  b, f, r = dc.global_batch_size, dc.num_frames, dc.resolution
  n = dc.num_image_frames
  length = config.model.text_encoder.max_position_embeddings
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding_lib.batch_sharding(mesh, len(shape)))
  if config.data.get('precomputed_latents', False):
    vae = config.model.vae  # The stored posterior (tools/encode_latents.py): no encoder in the step.
    side = r // 2 ** (len(vae.block_out_channels) - 1)
    pixels = {k: sds((b, f, side, side, vae.latent_channels), jnp.float32)
              for k in ('latent_mean', 'latent_std')}
  else:
    pixels = {'video': sds((b, f + n, r, r, 3), jnp.float32)}
  batch = dict(pixels, frame_mask=sds((b, f + n), jnp.bool_), fps=sds((b,), jnp.float32),
               input_ids=sds((b, length), jnp.int32))
  if n:
    batch['image_input_ids'] = sds((b, n, length), jnp.int32)
  return batch


# ----------------------------------------------------------------------------------------------------
# The state and the step, sharded.


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """What `create_train_state` builds. `init_fn`, `lower` and `compile` enter the mesh and the logical
  axis rules (`context()`) themselves: the models' sharding constraints need them while tracing."""
  mesh: Mesh
  rules: Tuple[Tuple[str, Any], ...]
  modules: Dict[str, Any]
  schedule: diffusion.Schedule
  tx: optax.GradientTransformation
  lr_schedule: Callable
  mask: Dict[str, bool]  # Flat parameter path -> trains.
  trainable_params: int
  total_params: int
  init_key: jax.Array  # rbg compiles the big init much faster than threefry; the step's keys stay threefry.
  boxed_state: TrainState  # eval_shape of the init: nn.Partitioned leaves with their logical axes.
  abstract_state: TrainState  # ShapeDtypeStructs with state_shardings.
  state_shardings: TrainState
  param_shardings: Params
  batch_struct: Dict[str, jax.ShapeDtypeStruct]
  jit_init: Callable  # key -> TrainState, out_shardings=state_shardings.
  jit_step: Callable  # (state, batch) -> (state, metrics); in/out shardings, state donated.

  @contextlib.contextmanager
  def context(self):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def init_fn(self, key: jax.Array) -> TrainState:
    with self.context():
      return self.jit_init(key)

  def lower(self, batch_struct: Optional[Dict[str, Any]] = None):
    with self.context():
      return self.jit_step.lower(self.abstract_state, batch_struct or self.batch_struct)

  def compile(self, batch_struct: Optional[Dict[str, Any]] = None) -> Tuple[Any, float]:
    """(AOT-compiled step, seconds to lower and compile it)."""
    t0 = time.time()
    compiled = self.lower(batch_struct).compile()
    return compiled, time.time() - t0


def create_train_state(config: ml_collections.ConfigDict, mesh: Mesh, *,
                       modules: Optional[Dict[str, Any]] = None,
                       batch_struct: Optional[Dict[str, jax.ShapeDtypeStruct]] = None,
                       init: Callable = init_params) -> TrainSetup:
  """The train state of `config` on `mesh`, from abstract shapes only (nothing is allocated until
  `init_fn` runs).

  `modules` default to `models.build_models(config.model)`, `batch_struct` to
  `abstract_batch(config, mesh)` (it sets the step's batch shardings); `init(modules, config, key)`
  gives the boxed params (flops.py's VDM baseline passes its own models and init).
  """
  rules = tuple(tuple(r) for r in config.sharding.logical_axis_rules)
  tc = config.train
  if config.get('lora') is not None:
    lora_lib.validate(config)
  if modules is None:
    modules = models_lib.build_models(config.model)
  if batch_struct is None:
    batch_struct = abstract_batch(config, mesh)
  schedule = diffusion.Schedule.from_config(config.diffusion)
  tx, lr_schedule = make_optimizer(config)
  init_key = jax.random.key(config.seed, impl='rbg')
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(functools.partial(init, modules, config), init_key)
  abstract_params = nn.unbox(boxed)
  mask = trainable_mask(abstract_params, tc.trainable)
  n_train = sum(int(np.prod(v.shape)) for p, v in traverse_util.flatten_dict(
      abstract_params, sep='/').items() if mask[p])
  n_total = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(abstract_params))
  if n_train == 0:
    raise ValueError(f'config.train.trainable={tuple(tc.trainable)} matches no parameter')
  logging.info('parameters: %s total, %s trainable', f'{n_total:,}', f'{n_train:,}')

  def init_state(key):
    """Boxed state: the optimizer moments inherit the logical axes of their parameters."""
    params = init(modules, config, key)
    trainable, _ = split_params(params, mask)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trainable),
                      ema_params=trainable)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed_state = jax.eval_shape(init_state, init_key)
  state_shardings = sharding_lib.logical_shardings(boxed_state, mesh, rules)
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                nn.unbox(boxed_state), state_shardings)

  train_step = make_train_step(config, modules, schedule, tx, lr_schedule, mask)
  batch_shardings = jax.tree.map(lambda s: s.sharding, batch_struct)
  jit_step = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
                     donate_argnums=0)
  jit_init = jax.jit(lambda k: nn.unbox(init_state(k)), out_shardings=state_shardings)
  return TrainSetup(
      mesh=mesh, rules=rules, modules=modules, schedule=schedule, tx=tx, lr_schedule=lr_schedule,
      mask=mask, trainable_params=n_train, total_params=n_total, init_key=init_key,
      boxed_state=boxed_state, abstract_state=abstract_state, state_shardings=state_shardings,
      param_shardings=state_shardings.params, batch_struct=batch_struct, jit_init=jit_init,
      jit_step=jit_step)
