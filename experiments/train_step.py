"""The pure, jitted pieces: state initialisation, one optimizer step, one evaluation batch.

The train state is a plain dict ``{"step", "params", "opt_state", "rng"}`` (what the
checkpoint holds). One optimizer step consumes ``(accum_steps, rows, length)`` tokens: the
micro-batches run in a ``lax.scan`` that sums float32 gradients, then the mean gradient goes
through the optimizer once, so optimizer counters and reset clocks count optimizer steps.
Each micro-batch's loss is its own token mean and the step's loss is the mean over
micro-batches, like the official loop (loss / gradient_accumulation, summed).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import models
import spam_optax
from spam_optax import _leaf_stats
from experiments import metrics as metrics_lib
from experiments import optimizers


def lm_loss(model, params, tokens, pad_id: int, rng):
  """Next-token cross-entropy of one ``(rows, length)`` batch, padding ignored."""
  logits = model.apply({"params": params}, tokens, rngs={"quant": rng})
  # Each position's target is the next token; the last position has none (pad, not counted).
  # The loss takes the logits whole: slicing off the last position would make the backward
  # pass pad a full-vocabulary float32 gradient back to the sequence length.
  targets = jnp.concatenate([tokens[:, 1:], jnp.full_like(tokens[:, :1], pad_id)], axis=1)
  loss, _ = models.cross_entropy_loss(
      logits, targets, targets != pad_id,
      implementation=model.config.elementwise_implementation)  # the model's kernel switch
  return loss


def make_init_fn(model, optimizer, *, param_dtype, example_tokens):
  """``(rng, params=None) -> train state``; parameters are created (or, given, taken) and cast
  to ``param_dtype``; the optimizer state is always fresh."""
  def init(rng, params=None):
    init_rng, rng = jax.random.split(rng)
    if params is None:
      params = nn.meta.unbox(model.init(init_rng, example_tokens)["params"])
    params = jax.tree.map(lambda p: p.astype(param_dtype), params)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": optimizer.init(params), "rng": rng}
  return init


def grad_spike_scale(step, spikes) -> jax.Array:
  """The factor of update ``step`` (1-based) from a static ``((step, scale), ...)`` table.

  The table is a constant of the compiled step and ``step`` a traced counter, so injecting
  spikes at any steps compiles once (``--inject_grad_spike``).
  """
  if not spikes:
    return jnp.ones((), jnp.float32)
  steps = jnp.asarray([s for s, _ in spikes], jnp.int32)
  scales = jnp.asarray([c for _, c in spikes], jnp.float32)
  return jnp.prod(jnp.where(steps == step, scales, 1.0))


def make_train_step(model, optimizer, schedule, *, pad_id: int, grad_spikes=()):
  """``(state, batch) -> (state, metrics)``; ``batch`` is int32 ``(accum, rows, length)``.

  ``grad_spikes``: ``((step, scale), ...)``; the mean gradient of update ``step`` is multiplied
  by ``scale`` before the optimizer sees it (and the logged ``grad_norm`` is of that gradient).
  """
  def train_step(state, batch):
    params = state["params"]
    rng, step_rng = jax.random.split(state["rng"])
    grad_fn = jax.value_and_grad(lambda p, t, r: lm_loss(model, p, t, pad_id, r))

    def micro_step(carry, xs):
      loss_sum, grad_sum = carry
      i, tokens = xs
      loss, grads = grad_fn(params, tokens, jax.random.fold_in(step_rng, i))
      grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
      return (loss_sum + loss, grad_sum), None

    accum = batch.shape[0]
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss_sum, grad_sum), _ = jax.lax.scan(
        micro_step, (jnp.zeros((), jnp.float32), zeros), (jnp.arange(accum), batch))
    # Gradients reach the optimizer in the parameter dtype (bf16 in the official runs).
    spike = grad_spike_scale(state["step"] + 1, grad_spikes)
    grads = jax.tree.map(lambda g, p: (g / accum * spike).astype(p.dtype), grad_sum, params)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics = {
        "loss": loss_sum / accum,
        "lr": schedule(state["step"]),
        "grad_norm": _leaf_stats.global_norm(grads),
        **spike_metrics(opt_state),
    }
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state,
                 "rng": rng}
    return new_state, metrics
  return train_step


def redraw_masks(state):
  """The train state with SPAM's sparse-momentum masks redrawn (``spam_optax.redraw_masks``):
  what the loop runs after the steps whose redraw it schedules (``Steps.after_step``)."""
  return {**state, "opt_state": spam_optax.redraw_masks(state["opt_state"], state["params"])}


PER_LEAF = "spike/clipped/"  # spam_optax.spike_stats' per-leaf keys


def spike_metrics(opt_state) -> dict:
  """``optimizers.spike_stats`` with the per-leaf clipped counts (one per parameter leaf, 58
  at 60m, 219 at 1b) packed into one ``metrics.PackedScalars``: one vector to fetch per step
  instead of one scalar each; the writer names them again."""
  stats = optimizers.spike_stats(opt_state)
  per_leaf = {k: v for k, v in stats.items() if k.startswith(PER_LEAF)}
  out = {k: v for k, v in stats.items() if k not in per_leaf}
  if per_leaf:
    out[PER_LEAF + "*"] = metrics_lib.PackedScalars.pack(per_leaf)
  return out


def make_eval_step(model, *, pad_id: int):
  """``(params, tokens, loss_sum) -> loss_sum + mean loss of the batch`` (stays on device)."""
  def eval_step(params, tokens, loss_sum):
    return loss_sum + lm_loss(model, params, tokens, pad_id, jax.random.key(0))
  return eval_step


def all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)
