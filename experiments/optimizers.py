"""The optimizer of a run: learning-rate schedule, optional global-norm clip, then the update rule.

``adamw``, ``adam``, ``adafactor``, ``lion`` and ``sgd`` are optax's own; ``spam`` and
``stable_spam`` come from ``spam_optax``. Every optimizer sees the same schedule (the
official one, below) and the same ``--grad_clipping``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from experiments import skip_step

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


def projection_mask(params):
  """True for the attention and MLP projection kernels (where sparse momentum applies)."""
  def is_projection(path, _):
    names = [str(getattr(k, "key", k)) for k in path]
    return any(m in names for m in SPARSE_MODULES) and names[-1] == "kernel"
  return jax.tree_util.tree_map_with_path(is_projection, params)


def _spam_module():
  try:
    import spam_optax  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit(f"spam_optax is not importable: {e}") from e
  return spam_optax


def _given(**kwargs) -> dict:
  """The keyword arguments whose flag was set (None leaves the optimizer's default)."""
  return {k: v for k, v in kwargs.items() if v is not None}


def make_optimizer(cfg, schedule=None) -> optax.GradientTransformation:
  """The update rule named by ``--optimizer``, behind ``--grad_clipping`` when it is set."""
  schedule = schedule or make_schedule(cfg)
  name = cfg.optimizer
  eps = 1e-8 if cfg.eps is None else cfg.eps
  if name == "adamw":
    opt = optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=eps,
                      weight_decay=cfg.weight_decay)
  elif name in ("adam", "skip_step"):
    # torch.optim.Adam's weight decay is L2 added to the gradient, before the moments.
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay) if cfg.weight_decay
                      else optax.identity(),
                      optax.adam(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=eps))
    if name == "skip_step":  # Adam that drops whole updates on gradient-norm spikes
      opt = skip_step.skip_on_grad_norm_spikes(
          opt, **_given(threshold=cfg.skip_threshold))
  elif name == "spam":
    spam_optax = _spam_module()
    opt = spam_optax.spam(
        schedule, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay,
        spike_threshold=cfg.threshold, warmup_steps=cfg.warmup_epoch,
        clip_delay=cfg.grad_accu_steps,
        density=None if cfg.density >= 1.0 else cfg.density,
        sparse_mask=projection_mask if cfg.density < 1.0 else None, seed=cfg.seed,
        **_given(eps=cfg.eps, reset_interval=cfg.DeltaT))
  elif name == "stable_spam":
    spam_optax = _spam_module()
    opt = spam_optax.stable_spam(
        schedule, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay,
        total_steps=cfg.total_T, eta_min=cfg.eta_min,
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
  if cfg.grad_clipping > 0:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clipping), opt)
  return opt


def spike_stats(opt_state) -> dict:
  """SPAM / Stable-SPAM's per-step spike statistics and skip_step's skips; empty otherwise."""
  try:
    import spam_optax  # pylint: disable=import-outside-toplevel
    fn = spam_optax.spike_stats
  except (ImportError, AttributeError):
    return skip_step.skip_stats(opt_state)
  return {**fn(opt_state), **skip_step.skip_stats(opt_state)}
