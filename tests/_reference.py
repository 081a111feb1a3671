"""The official hyperparameter names of the reference files, mapped to our aliases'."""

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
