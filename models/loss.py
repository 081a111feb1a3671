"""The language-model loss: token cross-entropy from logits, one pass over the vocabulary.

`token_nll` is −log softmax(logits)[target] per token. Its forward pass is one variadic
reduction over the vocabulary that carries, per token, the running maximum, the sum of
exponentials relative to it and the target's logit (the streaming log-sum-exp of flash
attention); its backward pass is one element-wise pass, `softmax − one_hot`.
Written with `jnp.max`, `logsumexp` and a pick of the target, XLA reads the
full-vocabulary logits three times in the forward pass (the maximum, the exponentials,
the pick); at 60M parameters and 64×256 tokens that is 2.1 GB of a 31 GB training step
with bf16 logits, twice that with float32 ones.

The forward's reduction and the backward's pass have two implementations
(``implementation``): "xla", the ``lax.reduce`` above and XLA's element-wise pass, and
"pallas", one Pallas kernel each way (``models.loss_kernels``: ``softmax_stats``,
``softmax_grad``) that reads and writes the logits 16 bytes at a time (XLA's reduction
loads 4, its backward pass 8), used only where each row of logits is 16-byte aligned (else
XLA's forms run). None takes ``pallas_platform.default_implementation()``: Pallas on
one GPU of compute capability ≥ 8.0. The models' ``LlamaConfig.elementwise_implementation``
is the trainer's choice for it, with the other element-wise kernels (RoPE's split, SwiGLU,
the projections' stacks).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from models import loss_kernels, pallas_platform

IMPLEMENTATIONS = ("xla", "pallas")


def _combine(a, b):
  """Merge two partial (max, sum of exp(x − max), picked) triples.

  The sum with the larger maximum is kept as it is and the other scaled by
  exp(−|m_a − m_b|): one exponential per merge (the reduction's cost on a GPU, where it
  runs once per logit), the same value as scaling each side by exp(m_x − max) since the
  larger side's factor is exactly 1. Equal maxima (both −inf included) give a factor of
  exactly 1, never exp(nan).
  """
  (m_a, s_a, p_a), (m_b, s_b, p_b) = a, b
  m = jnp.maximum(m_a, m_b)
  factor = jnp.exp(-jnp.where(m_a == m_b, 0.0, jnp.abs(m_a - m_b)))
  s = jnp.where(m_a >= m_b, s_a + s_b * factor, s_a * factor + s_b)
  return m, s, p_a + p_b


def _reduce(logits: jax.Array, targets: jax.Array):
  """Per token: the maximum logit, the sum of exp(logit − maximum), the target's logit."""
  x = logits.astype(jnp.float32)
  vocab = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  picked = jnp.where(vocab == targets[..., None].astype(jnp.int32), x, 0.0)
  zero, neg_inf = jnp.zeros((), jnp.float32), jnp.full((), -jnp.inf, jnp.float32)
  return lax.reduce((x, jnp.ones_like(x), picked), (neg_inf, zero, zero), _combine,
                    (x.ndim - 1,))


def _resolve(implementation: str | None, logits: jax.Array) -> str:
  """The implementation that runs: ``implementation`` (None: the platform's default), XLA's
  where the logits' rows are not 16-byte aligned."""
  implementation = implementation or pallas_platform.default_implementation()
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "pallas" and not loss_kernels.aligned(logits.shape[-1], logits.dtype):
    return "xla"
  return implementation


def token_nll(logits: jax.Array, targets: jax.Array,
              implementation: str | None = None) -> jax.Array:
  """−log softmax(logits)[..., target] in float32, shape `targets.shape`.

  `logits` (…, vocab) in any float dtype (computed in float32); `targets` (…) integer. The
  gradient with respect to `logits` is `softmax − one_hot(target)` in the logits' dtype;
  `targets` get none. `implementation`: the forward's reduction and the backward's pass,
  "xla" or "pallas" (None: the platform's default; see the module's docstring).
  """
  return _token_nll(logits, targets, _resolve(implementation, logits))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _token_nll(logits, targets, implementation):
  return _token_nll_fwd(logits, targets, implementation)[0]


def _token_nll_fwd(logits, targets, implementation):
  reduce = loss_kernels.softmax_stats if implementation == "pallas" else _reduce
  m, s, picked = reduce(logits, targets)
  return m + jnp.log(s) - picked, (logits, targets, m, s)


def _token_nll_bwd(implementation, res, g):
  logits, targets, m, s = res
  zero_targets = jnp.zeros(targets.shape, jax.dtypes.float0) \
      if jnp.issubdtype(targets.dtype, jnp.integer) else jnp.zeros_like(targets)
  if implementation == "pallas":
    return loss_kernels.softmax_grad(logits, targets, m, s, g), zero_targets
  x = logits.astype(jnp.float32)
  vocab = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  one_hot = vocab == targets[..., None].astype(jnp.int32)
  softmax = jnp.exp(x - m[..., None]) / s[..., None]
  grad = g[..., None] * (softmax - one_hot.astype(jnp.float32))
  return grad.astype(logits.dtype), zero_targets


_token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def cross_entropy_loss(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None, *,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Mean token cross-entropy in float32 and the number of tokens it averages over.

  `targets[b, t]` is the label for `logits[b, t]` (shift before calling: for a
  language model, logits of tokens[:, :-1] against tokens[:, 1:]). `mask` (same
  shape as `targets`, 0/1 or bool) selects the tokens counted; None counts all.
  `implementation`: `token_nll`'s.
  """
  nll = token_nll(logits, targets, implementation)
  mask = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
  n_tokens = jnp.sum(mask)
  loss = jnp.sum(nll * mask) / jnp.maximum(n_tokens, 1.0)
  return loss, n_tokens
