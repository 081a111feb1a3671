r"""Adam-mini as an optax transformation: one second-moment value per parameter block.

Zhang et al., *Adam-mini: Use Fewer Learning Rates To Gain More*, arXiv:2406.16793 (official
code: github.com/zyushun/Adam-mini, version 1.1). Adam keeps a second moment per entry;
Adam-mini keeps one per block of the Hessian's near-block-diagonal structure, the running mean
of the block's squared gradients. For a block :math:`B` of leaf :math:`g` at step :math:`t`:

.. math::
  m &\leftarrow \beta_1 m + (1 - \beta_1) g \\
  v_B &\leftarrow \beta_2 v_B + (1 - \beta_2)\, \mathrm{mean}_{i \in B}\, g_i^2 \\
  u &= \frac{m / (1 - \beta_1^t)}{\sqrt{v_B} / \sqrt{1 - \beta_2^t} + \epsilon}

(ε outside the bias correction, as the official code), then decoupled weight decay and the
learning rate: :math:`p \leftarrow p(1 - \eta\lambda) - \eta u`, no decay of the norm scales.

The LLaMA partition of the paper (version 1.1 of the official code): query and key projections
one block per head, value, output, MLP projections and the output head one block per output
neuron, the embedding one block per token row, each norm scale one block. A block here is a set
of axes of a leaf averaged over; the second moment keeps the leaf's shape with those axes of
size 1. In the ``scan_layers`` layout (decoder leaves under ``layers`` with a leading layer
axis) blocks never span layers.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from spam_optax._numerics import one_minus_power
from spam_optax._tree_util import path_names, tree_map_unzip

BlockAxesFn = Callable[[Sequence[Any], jax.Array], tuple[int, ...]]



def llama_block_axes(path, leaf) -> tuple[int, ...]:
  """The axes of ``leaf`` averaged into one block (Adam-mini's LLaMA partition).

  Our kernels are Flax's ``(inputs..., outputs...)``: q/k/v ``(embed, heads, head_dim)``,
  o ``(heads, head_dim, embed)``, MLP ``(in, out)``, the head ``(embed, vocab)``; the
  embedding is ``(vocab, embed)``.

  Args:
    path: the leaf's key path in the parameter tree (HF names, see ``models.llama``).
    leaf: the parameter (or gradient) leaf; only its ``ndim`` is read.

  Returns:
    The reduced axes; the remaining axes index the blocks.
  """
  names = path_names(path)
  lead = 1 if "layers" in names else 0  # scan_layers: axis 0 is the layer
  module = names[-2] if len(names) > 1 else ""
  if module in ("q_proj", "k_proj"):  # one block per head
    return (lead, lead + 2)
  if module == "embed_tokens":  # one block per token row
    return tuple(range(lead + 1, leaf.ndim))
  if module == "o_proj":  # one block per output neuron: (heads, head_dim) are the inputs
    return (lead, lead + 1)
  if module in ("v_proj", "lm_head") or "mlp" in names:  # one block per output neuron
    return (lead,)
  return tuple(range(lead, leaf.ndim))  # norm scales (and anything else): the whole leaf


def num_blocks(params, block_axes: BlockAxesFn = llama_block_axes):
  """The number of second-moment values (blocks) per leaf, as a tree like ``params``."""
  def count(path, x):
    axes = block_axes(path, x)
    return x.size // math.prod(x.shape[a] for a in axes)
  return jax.tree_util.tree_map_with_path(count, params)


def not_norm(params):
  """Weight-decay mask of the official code: every leaf but the norm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any("norm" in n for n in path_names(path)), params)


class ScaleByAdamMiniState(NamedTuple):
  """State of :func:`scale_by_adam_mini`.

  Attributes:
    count: updates applied so far (int32).
    mu: the first moment, one entry per parameter entry.
    nu: the second moment, one value per block (the leaf's shape, reduced axes of size 1),
      float32.
  """
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam_mini(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    block_axes: BlockAxesFn = llama_block_axes,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
  r"""Rescales updates by Adam-mini's block-wise second moment (no learning rate).

  Args:
    b1: :math:`\beta_1`, first-moment decay.
    b2: :math:`\beta_2`, decay of the block means of :math:`g^2`.
    eps: :math:`\epsilon`, added to :math:`\sqrt{v}` after its bias correction.
    block_axes: ``(path, leaf) -> axes`` averaged into one block; default
      :func:`llama_block_axes`.
    mu_dtype: dtype of the first moment (default: the leaf's). The second moment, one value
      per block, is always float32.

  Returns:
    An :class:`optax.GradientTransformation`.

  References:
    Zhang et al., `Adam-mini: Use Fewer Learning Rates To Gain More
    <https://arxiv.org/abs/2406.16793>`_, 2024.
  """
  def nu_like(path, x):
    shape = list(x.shape)
    for a in block_axes(path, x):
      shape[a] = 1
    return jnp.zeros(shape, jnp.float32)

  def init_fn(params):
    return ScaleByAdamMiniState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=jax.tree_util.tree_map_with_path(nu_like, params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    bc1 = one_minus_power(b1, count)
    sqrt_bc2 = jnp.sqrt(one_minus_power(b2, count))

    def leaf(g, m, v, axes):
      g32 = g.astype(jnp.float32)
      m32 = b1 * m.astype(jnp.float32) + (1.0 - b1) * g32
      v = b2 * v + (1.0 - b2) * jnp.mean(g32 * g32, axis=axes, keepdims=True)
      u = (m32 / bc1) / (jnp.sqrt(v) / sqrt_bc2 + eps)
      return u.astype(g.dtype), m32.astype(m.dtype), v

    axes = jax.tree_util.tree_map_with_path(block_axes, updates)
    u, m, v = tree_map_unzip(leaf, 3, updates, state.mu, state.nu, axes)
    return u, ScaleByAdamMiniState(count=count, mu=m, nu=v)

  return optax.GradientTransformation(init_fn, update_fn)


def adam_mini(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    block_axes: BlockAxesFn = llama_block_axes,
    mask: Any = not_norm,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
  r"""Adam-mini with decoupled weight decay, as the official ``Adam_mini``.

  :math:`p \leftarrow p(1 - \eta\lambda) - \eta u` with :math:`u` from
  :func:`scale_by_adam_mini`; the decay skips the norm scales (``mask``).

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    b1: :math:`\beta_1`.
    b2: :math:`\beta_2`.
    eps: :math:`\epsilon`.
    weight_decay: :math:`\lambda`, decoupled (AdamW style).
    block_axes: the partition, see :func:`llama_block_axes`.
    mask: which leaves are decayed (tree of bools or callable); default: all but norms.
    mu_dtype: dtype of the first moment.

  Returns:
    An :class:`optax.GradientTransformation`.
  """
  return optax.chain(
      scale_by_adam_mini(b1, b2, eps, block_axes=block_axes, mu_dtype=mu_dtype),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
