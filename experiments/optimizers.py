"""The optimizer of a run: learning-rate schedule, optional global-norm clip, then the update rule.

``adamw``, ``adam``, ``adafactor``, ``lion`` and ``sgd`` are optax's own; ``spam`` and
``stable_spam`` come from ``spam_optax``; the papers' other baselines are ``adam_mini``
(``experiments.adam_mini``), ``galore`` and ``muon`` (``optax.contrib``). ``--spike_guard``
puts Stable-SPAM's or SPAM's pieces in front of a base optimizer. Every optimizer sees the
same schedule (the official one, below) and the same ``--grad_clipping``.
"""
from __future__ import annotations

import inspect
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import spam_optax
from spam_optax._tree_util import path_names
from experiments import adam_mini, skip_step
from experiments.config import fail

# Sparse momentum covers the projection weights of attention and MLP blocks only, like the
# official script's `target_modules_list = ["attn", "mlp"]` (embeddings, head, norms stay dense).
SPARSE_MODULES = ("self_attn", "mlp")


def lr_factor(step, *, scheduler: str, warmup_steps: int, num_training_steps: int,
              min_lr_ratio: float):
  """The official ``LambdaLR`` factor λ(step); optax calls it with the number of updates done.

  So update k (1-based) uses λ(k-1): the very first update has learning rate 0, as in the
  official runs. Warm-up is linear from 0; the decay reaches ``min_lr_ratio`` at
  ``num_training_steps`` and stays there.
  """
  step = jnp.asarray(step, jnp.float32)
  warm = step / max(1, warmup_steps)
  progress = jnp.clip((step - warmup_steps) / max(1, num_training_steps - warmup_steps), 0.0, 1.0)
  if scheduler == "cosine":
    decay = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
  elif scheduler == "linear":
    decay = 1.0 - (1.0 - min_lr_ratio) * progress
  elif scheduler == "constant":
    decay = jnp.ones_like(step)
  else:
    raise ValueError(f"unknown scheduler {scheduler!r}")
  return jnp.where(step < warmup_steps, warm, decay)


def make_schedule(cfg) -> optax.Schedule:
  def schedule(count):
    return cfg.lr * lr_factor(count, scheduler=cfg.scheduler, warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.num_training_steps,
                              min_lr_ratio=cfg.min_lr_ratio)
  return schedule



def _is_projection(path) -> bool:
  names = path_names(path)
  return any(m in names for m in SPARSE_MODULES) and names[-1] == "kernel"


def projection_mask(params):
  """True for the attention and MLP projection kernels (where sparse momentum applies)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _is_projection(path), params)


def matrix_axes(path, leaf):
  """``(input axes, output axes)`` of an attention/MLP projection kernel, None for other leaves.

  The kernels are linear maps stored as Flax ``(inputs..., outputs...)``: q/k/v
  ``(embed, heads, head_dim)``, o ``(heads, head_dim, embed)``, MLP ``(in, out)``. In the
  ``scan_layers`` layout (leaves under ``layers``) axis 0 is the layer and belongs to neither.
  """
  if not _is_projection(path):
    return None
  names = path_names(path)
  lead = _layer_axes(names)
  n_in = 2 if "o_proj" in names else 1
  return tuple(range(lead, lead + n_in)), tuple(range(lead + n_in, leaf.ndim))


def _layer_axes(names) -> int:
  """1 for a leaf under ``layers`` (the ``scan_layers`` layout's stacked layer axis), else 0."""
  return int("layers" in names)


def stacked_layer_axes(params):
  """1 for the leaves under ``layers`` (the ``scan_layers`` layout's stacked axis), else 0.

  The ``stacked_axes`` of ``spam_optax.stable_spam``: AdaClip and AdaGN then keep one
  statistic per layer, as they do for the separate ``layers_<i>`` tensors.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _layer_axes(path_names(path)), params)


def _given(**kwargs) -> dict:
  """The keyword arguments whose flag was set (None leaves the optimizer's default)."""
  return {k: v for k, v in kwargs.items() if v is not None}


def make_optimizer(cfg, schedule=None) -> optax.GradientTransformation:
  """The update rule named by ``--optimizer``, behind ``--grad_clipping`` when it is set."""
  schedule = schedule or make_schedule(cfg)
  outer_schedule = schedule
  if cfg.spike_guard == "stable_spam":
    # The guard restarts the base afresh, its step counts included; the schedule must keep
    # counting, so it scales the base's updates from outside (see _stable_spam_guard).
    schedule = optax.constant_schedule(1.0)
  name = cfg.optimizer
  eps = 1e-8 if cfg.eps is None else cfg.eps
  if name in BASELINES:
    opt = BASELINES[name](cfg, schedule)
  elif name == "adamw":
    opt = optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=eps,
                      weight_decay=cfg.weight_decay)
  elif name in ("adam", "skip_step"):
    # torch.optim.Adam's weight decay is L2 added to the gradient, before the moments.
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay) if cfg.weight_decay
                      else optax.identity(),
                      optax.adam(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=eps))
  elif name == "spam":
    opt = spam_optax.spam(
        schedule, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay,
        spike_threshold=cfg.threshold, warmup_steps=cfg.warmup_epoch,
        clip_delay=cfg.grad_accu_steps,
        density=None if cfg.density >= 1.0 else cfg.density,
        sparse_mask=projection_mask if cfg.density < 1.0 else None, seed=cfg.seed,
        redraw_masks_in_update=not mask_redraw_interval(cfg),
        **_given(eps=cfg.eps, reset_interval=cfg.DeltaT))
  elif name == "stable_spam":
    opt = spam_optax.stable_spam(
        schedule, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay,
        total_steps=cfg.total_T or cfg.num_training_steps, eta_min=cfg.eta_min,
        stacked_axes=stacked_layer_axes if cfg.scan_layers else None,
        **_given(eps=cfg.eps, gamma1=cfg.gamma1, gamma2=cfg.gamma2, gamma3=cfg.gamma3,
                 reset_interval=cfg.DeltaT))
  elif name == "adafactor":
    # The papers' baseline is HF Adafactor(beta1=0.9, eps=(1e-30, 1e-3), clip_threshold=1.0,
    # decay_rate=-0.8, relative_step=False, scale_parameter=False); eps[1] only matters with
    # scale_parameter, and HF's decay_rate -0.8 is optax's 0.8.
    opt = optax.adafactor(schedule, decay_rate=0.8, clipping_threshold=1.0,
                          momentum=cfg.beta1 or None, eps=1e-30,
                          multiply_by_parameter_scale=False,
                          weight_decay_rate=cfg.weight_decay or None)
  elif name == "lion":
    opt = optax.lion(schedule, b1=cfg.beta1, b2=0.99, weight_decay=cfg.weight_decay)
  elif name == "sgd":
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay) if cfg.weight_decay
                      else optax.identity(), optax.sgd(schedule))
  else:
    raise SystemExit(f"error: unknown --optimizer {name!r}")
  if cfg.spike_guard == "stable_spam":
    opt = optax.chain(_stable_spam_guard(cfg, opt), optax.scale_by_schedule(outer_schedule))
  elif cfg.spike_guard == "spam_clip":
    opt = _spam_clip_guard(cfg, opt)
  if cfg.grad_clipping > 0:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clipping), opt)
  if name == "skip_step":  # decides on the raw gradient norm, before any clip (as MaxText)
    opt = skip_step.skip_on_grad_norm_spikes(opt, **_given(threshold=cfg.skip_threshold))
  return opt


def mask_redraw_interval(cfg) -> int:
  """Every how many steps the training loop redraws the sparse-momentum masks (0: never).

  SPAM with ``--density`` < 1 is built with ``redraw_masks_in_update=False`` and the loop
  calls ``spam_optax.redraw_masks`` after the steps ``spam_optax.redraw_due`` names: the same
  trajectory, with no ``lax.cond`` in the step, which XLA:GPU would make wait on the host at
  every step. The optimizer's update count is the loop's step (nothing here skips updates).
  """
  if cfg.optimizer != "spam" or cfg.density >= 1.0:
    return 0
  default = inspect.signature(spam_optax.spam).parameters["reset_interval"].default
  return default if cfg.DeltaT is None else cfg.DeltaT


def spike_stats(opt_state) -> dict:
  """SPAM / Stable-SPAM's per-step spike statistics and skip_step's skips; empty otherwise."""
  return {**spam_optax.spike_stats(opt_state), **skip_step.skip_stats(opt_state)}


# ---------------------------------------------------------------------------------------------
# The papers' other baselines (docs/training.md, "Other baselines and spike guards").

# Keller Jordan's Newton-Schulz coefficients (optax's default).
MUON_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def _require_optax(fn: str, argument: str | None = None) -> None:
  """One-line error when the installed optax lacks ``optax.contrib.<fn>`` (or its argument)."""
  have = getattr(optax.contrib, fn, None)
  if have is None or (argument and argument not in inspect.signature(have).parameters):
    fail(f"--optimizer {fn} needs optax>=0.2.7 (optax.contrib.{fn}"
         f"{'(' + argument + '=...)' if argument else ''}); installed optax {optax.__version__}")


def _adam_mini(cfg, schedule):
  """Adam-mini (arXiv:2406.16793): one second moment per block, AdamW-style decay."""
  return adam_mini.adam_mini(schedule, b1=cfg.beta1, b2=cfg.beta2,
                             eps=1e-8 if cfg.eps is None else cfg.eps,
                             weight_decay=cfg.weight_decay)


def _galore_dims(params):
  """GaLore's matrix view of each projection kernel; None (plain Adam) for the rest."""
  def dims(path, x):
    axes = matrix_axes(path, x)
    if axes is None:
      return None
    if "layers" in path_names(path):
      fail("--optimizer galore projects each layer's kernel on its own and does not support "
           "the scan_layers parameter layout")
    return optax.contrib.GaLoreDimensionNumbers(*axes)
  return jax.tree_util.tree_map_with_path(dims, params)


def _galore(cfg, schedule):
  """GaLore (arXiv:2403.03507) on the attention/MLP projections, Adam on the rest.

  Defaults are the official 60M script's: rank 128, projection update gap 200, scale 0.25;
  Adam's ε is GaLore AdamW's 1e-6.
  """
  _require_optax("galore")
  return _no_empty_projectors(optax.contrib.galore(
      schedule, rank=cfg.rank or 128, update_proj_gap=cfg.DeltaT or 200,
      scale=0.25 if cfg.galore_scale is None else cfg.galore_scale,
      base_optimizer=optax.scale_by_adam(cfg.beta1, cfg.beta2,
                                         eps=1e-6 if cfg.eps is None else cfg.eps),
      weight_decay=cfg.weight_decay, weight_dimension_numbers=_galore_dims))


def _map_states(state, state_type, fn):
  """Applies ``fn`` to every ``state_type`` node of an optimizer state."""
  is_it = lambda s: isinstance(s, state_type)
  return jax.tree.map(lambda s: fn(s) if is_it(s) else s, state, is_leaf=is_it)


def _no_empty_projectors(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """optax's GaLore keeps a (0, 0) projector for each leaf it does not project, and orbax
  cannot save zero-size arrays: the state holds an int32 0 in their place between updates."""
  galore_state = optax.contrib.GaLoreState

  def hide(s):
    return s._replace(projector=jax.tree.map(
        lambda p: jnp.zeros((), jnp.int32) if p.size == 0 else p, s.projector))

  def init_fn(params):
    return _map_states(inner.init(params), galore_state, hide)

  def update_fn(updates, state, params=None):
    def show(s):
      return s._replace(projector=jax.tree.map(
          lambda p, g: jnp.zeros((0, 0), g.dtype) if p.ndim == 0 else p, s.projector, updates))
    updates, state = inner.update(updates, _map_states(state, galore_state, show), params)
    return updates, _map_states(state, galore_state, hide)

  return optax.GradientTransformation(init_fn, update_fn)


def _muon_dims(params):
  """Muon's matrix view of each projection kernel; None (AdamW) for embeddings, head, norms."""
  def dims(path, x):
    axes = matrix_axes(path, x)
    return None if axes is None else optax.contrib.MuonDimensionNumbers(*axes)
  return jax.tree_util.tree_map_with_path(dims, params)


def _muon(cfg, schedule):
  """Muon (Jordan et al. 2024) on the hidden projections, AdamW on the rest, one schedule.

  Muon's update is scaled to AdamW's RMS (``consistent_rms=0.2``, Liu et al. 2025,
  arXiv:2502.16982), so one ``--lr`` serves both parts; Muon's momentum is its own 0.95.
  """
  _require_optax("muon", "consistent_rms")
  return optax.contrib.muon(
      schedule, ns_coeffs=MUON_NS_COEFFS, beta=0.95, eps=1e-8 if cfg.eps is None else cfg.eps,
      weight_decay=cfg.weight_decay, adam_b1=cfg.beta1, adam_b2=cfg.beta2,
      adam_weight_decay=cfg.weight_decay, muon_weight_dimension_numbers=_muon_dims,
      consistent_rms=0.2)


BASELINES = {"adam_mini": _adam_mini, "galore": _galore, "muon": _muon}


class RestartState(NamedTuple):
  count: jax.Array  # int32, updates so far
  inner_state: optax.OptState


def restart_every(inner: optax.GradientTransformation,
                  interval: int) -> optax.GradientTransformation:
  """``inner`` started afresh before every ``interval``-th update (0: never).

  Its whole state is re-initialised: moments zeroed *and* step counts reset, so bias
  corrections (Adam's 1 - β^t, Adafactor's decay schedule) restart as after a fresh start —
  Stable-SPAM's momentum reset (MoRet, arXiv:2502.17055), which restarts Adam's bias correction,
  for any base. ``spam_optax.periodic_reset`` zeroes the moments only and keeps the counts;
  with a bias-corrected base that makes the first updates after a reset several times larger
  (≈ (1 - β1)/√(1 - β2) ≈ 3 for Adam's defaults).
  """
  def init_fn(params):
    return RestartState(jnp.zeros([], jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None):
    count = state.count + 1
    restart = jnp.logical_and(interval > 0, count % max(interval, 1) == 0)
    fresh = inner.init(params if params is not None else updates)
    inner_state = optax.tree.where(restart, fresh, state.inner_state)
    updates, inner_state = inner.update(updates, inner_state, params)
    return updates, RestartState(count, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def _stable_spam_guard(cfg, base):
  """Stable-SPAM's AdaClip and AdaGN in front of ``base``, which restarts every ``--DeltaT``.

  AdaClip and AdaGN take the arguments of ``spam_optax.stable_spam``; ``base`` (built with a
  learning rate of 1, the schedule applied after it by the caller) is restarted afresh every
  ``--DeltaT`` updates (default 1000) by :func:`restart_every`, before that update — moments
  and bias corrections, as Stable-SPAM's own Adam does after a reset.
  """
  interval = 1000 if cfg.DeltaT is None else cfg.DeltaT
  stacked = stacked_layer_axes if cfg.scan_layers else None
  return optax.chain(
      spam_optax.clip_by_running_max_and_grad_norm_history(
          total_steps=cfg.total_T or cfg.num_training_steps, eta_min=cfg.eta_min,
          reset_interval=interval, stacked_axes=stacked,
          **_given(gamma3=cfg.gamma3, gamma1=cfg.gamma1, gamma2=cfg.gamma2, eps=cfg.eps)),
      restart_every(base, interval))


def _spam_clip_guard(cfg, base):
  """SPAM's spike clip (``--threshold``, ``--grad_accu_steps``) in front of ``base``.

  The clip keeps its own EMA of g² (β = ``--beta2``); entries it has not seen yet are left
  alone (``clip_unseen=False``) rather than frozen.
  """
  return optax.chain(
      spam_optax.spam_clip(spike_threshold=cfg.threshold, b2=cfg.beta2,
                           clip_delay=cfg.grad_accu_steps, clip_unseen=False),
      base)


