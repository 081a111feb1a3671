"""The ready-made optimizers: SPAM and Stable-SPAM as chains of the blocks."""
from typing import Any, Optional

import jax
import optax

from spam_optax import _clip_and_norm_history
from spam_optax import _periodic_reset
from spam_optax import _reset_warmup
from spam_optax import _scale_by_spam
from spam_optax import _sparse_moments
from spam_optax import _stacked_axes
from spam_optax import _stable_spam_adam
from spam_optax import _tree_util
from spam_optax import _validation
from spam_optax import _weight_decay


def _dense_leaf_mask(sparse_mask: _tree_util.MaskOrFn):
  """The complement of the sparse-leaf mask, as a function of the params."""
  def mask_fn(params):
    return jax.tree.map(
        lambda m: not m, _sparse_moments.sparse_leaf_mask(sparse_mask, params)
    )
  return mask_fn


def spam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    spike_threshold: float = 5000.0,
    reset_interval: int = 500,
    warmup_steps: int = 150,
    clip_delay: int = 20,
    density: Optional[float] = None,
    sparse_mask: _tree_util.MaskOrFn = None,
    seed: int = 0,
    mu_dtype: Optional[Any] = None,
    redraw_masks_in_update: bool = True,
) -> optax.GradientTransformation:
  r"""SPAM: Adam with spike clipping, periodic momentum reset and warm-up.

  Reproduces the official ``SPAM.AdamW``. At step :math:`t` (see
  ``docs/optimizers.md``): every ``reset_interval`` steps the moments are zeroed
  (the step count is not); gradient entries with :math:`g^2 > \theta\nu_{t-1}`
  are clipped to :math:`\pm\sqrt{\theta\nu_{t-1}}` (from step ``clip_delay``
  on, and ``clip_delay`` steps after each reset); Adam's update is scaled by a
  cosine warm-up from 0.01 to 1 over ``warmup_steps`` after each reset; then
  decoupled weight decay is applied to the *updated* parameters:

  .. math::
    p \leftarrow (p - \eta\, s_t u_t)(1 - \eta\lambda).

  It is the chain ``periodic_reset(scale_by_spam)``, ``scale_by_reset_warmup``,
  ``scale_by_learning_rate``, ``add_decayed_weights_after_update``. With
  ``density`` the moments are kept only for a random fraction of the entries
  of the sparse leaves (default: every 2-D leaf), and, as in the official
  code, weight decay is a no-op on those leaves (**quirk**).

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to :math:`\sqrt{\nu}` (outside the bias correction).
    weight_decay: :math:`\lambda`, decoupled.
    spike_threshold: :math:`\theta` (official ``threshold``); 0 disables the
      clip.
    reset_interval: official ``DeltaT``; 0 = never reset.
    warmup_steps: official ``warmup_steps``, the ramp after each reset.
    clip_delay: official ``grad_accu_steps``, how long the clip holds off.
    density: fraction of entries with moments in the sparse leaves (static;
      with ``optax.inject_hyperparams`` list it in ``static_args``); None =
      dense.
    sparse_mask: which leaves are sparse: a tree of booleans or a callable of
      the params (as in :func:`optax.masked`); default every 2-D leaf.
    seed: seed of the random momentum masks.
    mu_dtype: dtype of Adam's two moments, the first moment :math:`m` *and*
      the second moment :math:`v` (unlike :func:`optax.adamw`, where it sets
      only :math:`m`); also of the stand-in moments of ``density``. None keeps
      the parameters' dtype. The update is computed in the wider of the
      gradient's and this dtype and returned in the gradient's dtype.
    redraw_masks_in_update: with ``density``, redraw the masks inside
      ``update`` every ``reset_interval`` steps (a ``lax.cond``). False leaves
      the redraw to the training loop: :func:`spam_optax.redraw_masks` after
      each step for which :func:`spam_optax.redraw_due` holds, the same states
      and updates with no conditional in ``update`` (on a GPU, XLA waits on the
      host for a conditional's predicate at every update).

  Returns:
    A :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import spam_optax
    >>> opt = spam_optax.spam(learning_rate=1e-3)
    >>> params = {'w': jnp.ones((2, 3)), 'b': jnp.zeros(3)}
    >>> state = opt.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = opt.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training <https://arxiv.org/abs/2501.06842>`_, 2025.
  """
  _validation.check_learning_rate(learning_rate)
  moments = _periodic_reset.periodic_reset(
      _scale_by_spam.scale_by_spam(
          b1=b1,
          b2=b2,
          eps=eps,
          spike_threshold=spike_threshold,
          clip_delay=clip_delay,
          reset_interval=reset_interval,
          mu_dtype=mu_dtype,
      ),
      reset_interval,
  )
  decay_mask = None
  if density is not None:
    moments = _sparse_moments.sparse_moments(
        moments,
        density=density,
        sparse_mask=sparse_mask,
        reset_interval=reset_interval if redraw_masks_in_update else 0,
        seed=seed,
    )
    # Quirk: the official code decays a copy of sparse leaves, a no-op.
    decay_mask = _dense_leaf_mask(sparse_mask)
  return optax.chain(
      moments,
      _reset_warmup.scale_by_reset_warmup(reset_interval, warmup_steps),
      optax.scale_by_learning_rate(learning_rate),
      _weight_decay.add_decayed_weights_after_update(
          learning_rate, weight_decay, mask=decay_mask
      ),
  )


def stable_spam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    gamma1: float = 0.7,
    gamma2: float = 0.9,
    gamma3: float = 0.999,
    reset_interval: int = 1000,
    total_steps: Optional[int] = None,
    eta_min: float = 0.5,
    mu_dtype: Optional[Any] = None,
    stacked_axes: _stacked_axes.StackedAxes = None,
) -> optax.GradientTransformation:
  r"""Stable-SPAM: AdaClip, AdaGN and Adam with momentum reset.

  Reproduces the official ``StableSPAM``. Per leaf at step :math:`t` (see
  ``docs/optimizers.md``): clip entries above a bias-corrected running max of
  :math:`|g|` (AdaClip, :math:`\gamma_3`); rescale the leaf by the history of
  its norm (AdaGN, :math:`\gamma_1, \gamma_2`); Adam with
  :math:`\beta_1' = \beta_1 s_t` (cosine over ``total_steps``); moments zeroed
  after every ``reset_interval``-th step (**quirk** timing, and the
  bias-correction step restarts); decoupled weight decay of the old parameters:

  .. math::
    p \leftarrow p(1 - \eta\lambda) - \eta\, u_t.

  It is the chain ``clip_by_running_max_and_grad_norm_history`` (AdaClip and
  AdaGN, the chain of ``clip_by_running_max`` and
  ``scale_by_grad_norm_history`` with the same state, in fewer passes over
  the gradient), ``periodic_reset(scale_by_stable_spam_adam,
  after_update=True)``, ``add_decayed_weights``, ``scale_by_learning_rate``.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    b1: :math:`\beta_1`.
    b2: :math:`\beta_2`.
    eps: :math:`\epsilon` of Adam and AdaGN.
    weight_decay: :math:`\lambda`, decoupled.
    gamma1: AdaGN's norm EMA decay.
    gamma2: AdaGN's squared-norm EMA decay.
    gamma3: AdaClip's running-max decay.
    reset_interval: official ``update_proj_gap``; 0 = never reset.
    total_steps: official ``total_T``; enables the cosine decay of
      :math:`\beta_1` and :math:`\gamma_1` down to ``eta_min`` times their
      value.
    eta_min: floor of that cosine scale.
    mu_dtype: dtype of Adam's two moments, the first moment :math:`m` *and*
      the second moment :math:`v` (unlike :func:`optax.adamw`, where it sets
      only :math:`m`). None keeps the parameters' dtype. The per-leaf scalar
      statistics of AdaClip and AdaGN are float32 (float64 for float64
      leaves) whatever this is.
    stacked_axes: for leaves that stack several tensors on leading axes (the
      layers of a scanned model, shape ``(layers, ...)``), how many such axes
      each leaf has: an int, a tree of ints with the structure of the params,
      or a callable of the params returning one. AdaClip and AdaGN then keep
      their statistics per slice, as the official code does per tensor. None:
      each leaf is one tensor. With ``optax.inject_hyperparams``, list an
      int or a callable in ``static_args``.

  Returns:
    A :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import spam_optax
    >>> opt = spam_optax.stable_spam(learning_rate=1e-3, total_steps=10_000)
    >>> params = {'w': jnp.ones((2, 3))}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({'w': jnp.ones((2, 3))}, state, params)

  References:
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit
    Adam <https://arxiv.org/abs/2502.17055>`_, 2025.
  """
  _validation.check_learning_rate(learning_rate)
  _validation.check_non_negative("weight_decay", weight_decay)
  return optax.chain(
      _clip_and_norm_history.clip_by_running_max_and_grad_norm_history(
          gamma3=gamma3,
          gamma1=gamma1,
          gamma2=gamma2,
          eps=eps,
          total_steps=total_steps,
          eta_min=eta_min,
          reset_interval=reset_interval,
          stacked_axes=stacked_axes,
      ),
      _periodic_reset.periodic_reset(
          _stable_spam_adam.scale_by_stable_spam_adam(
              b1=b1,
              b2=b2,
              eps=eps,
              total_steps=total_steps,
              eta_min=eta_min,
              reset_interval=reset_interval,
              mu_dtype=mu_dtype,
          ),
          reset_interval,
          after_update=True,
      ),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
