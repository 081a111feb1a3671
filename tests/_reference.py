"""The recorded official trajectories in ``tests/data/`` and their hyperparameter names.

One ``.npz`` file per scenario and dtype (``float64`` and ``float32``), recorded by running
the official PyTorch optimizers (SPAM-Optimizer ``SPAM.AdamW``, StableSPAM ``StableSPAM``)
on Gaussian gradients of drifting scale with injected spikes. Keys:

- ``meta``: a JSON string with ``optimizer`` (``spam`` | ``stable_spam``),
  ``hyperparameters`` (the official constructor names, mapped by `alias_kwargs`),
  ``density`` (or null), ``dtype``, ``steps``, ``params`` (name -> shape) and ``spikes``;
- ``p0/<name>``: the initial parameter; ``g/<name>``: the gradient fed at each step,
  shape ``(steps, *shape)``; ``p/<name>``: the parameter after each step;
- ``mask/<name>`` (sparse scenario only): the sorted flat indices of the momentum mask in
  force at each step, shape ``(steps, k)``.

The replay tests feed the recorded gradients to our aliases and compare the parameters
after every step (the update rules are written out in docs/optimizers.md).
"""
import pathlib

import jax

REFERENCE_DIR = pathlib.Path(__file__).parent / "data"

try:  # jax >= 0.8
  enable_x64 = jax.enable_x64
except AttributeError:  # older jax: the same context manager, still experimental
  import jax.experimental
  enable_x64 = jax.experimental.enable_x64

# Official constructor names -> keyword arguments of `spam()` / `stable_spam()`.
SPAM_NAMES = {
    "lr": "learning_rate",
    "eps": "eps",
    "weight_decay": "weight_decay",
    "threshold": "spike_threshold",
    "DeltaT": "reset_interval",
    "warmup_steps": "warmup_steps",
    "grad_accu_steps": "clip_delay",
}
STABLE_SPAM_NAMES = {
    "lr": "learning_rate",
    "eps": "eps",
    "weight_decay": "weight_decay",
    "gamma1": "gamma1",
    "gamma2": "gamma2",
    "gamma3": "gamma3",
    "update_proj_gap": "reset_interval",
    "total_T": "total_steps",
    "eta_min": "eta_min",
}


def alias_kwargs(meta):
  """Our alias's keyword arguments for the official hyperparameters in ``meta``."""
  names = SPAM_NAMES if meta["optimizer"] == "spam" else STABLE_SPAM_NAMES
  kwargs = {}
  for name, value in meta["hyperparameters"].items():
    if name == "betas":
      kwargs["b1"], kwargs["b2"] = value
    else:
      kwargs[names[name]] = value
  return kwargs
