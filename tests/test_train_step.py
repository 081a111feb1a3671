"""experiments/train_step.py's pieces: the loss of one batch takes the model's kernel switch."""
import jax
import numpy as np

import models
from models import loss_kernels

from experiments import train_step


def test_the_trainer_loss_takes_the_models_switch(monkeypatch):
  """`train_step.lm_loss` runs the kernel when the model's `elementwise_implementation` is
  "pallas", and gives the loss of XLA's form."""
  config = models.LlamaConfig(name="tiny", hidden_size=32, intermediate_size=64, num_heads=2,
                              num_layers=1, vocab_size=256, max_seq_len=8, dtype="float32",
                              param_dtype="float32", norm_implementation="xla",
                              elementwise_implementation="xla")
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, config.vocab_size)
  params = jax.jit(models.Llama(config).init)(jax.random.key(1), tokens)["params"]
  called = []
  real = loss_kernels.softmax_stats
  monkeypatch.setattr(loss_kernels, "softmax_stats", lambda *a: called.append(1) or real(*a))
  losses = {}
  for implementation in ("xla", "pallas"):
    model = models.Llama(config.replace(elementwise_implementation=implementation))
    losses[implementation] = jax.jit(  # compiled: the interpreted kernel op by op takes seconds
        lambda p, m=model: train_step.lm_loss(m, p, tokens, -1, jax.random.key(2)))(params)
    assert bool(called) == (implementation == "pallas")
  np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-6)
