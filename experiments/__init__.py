"""Pretraining LLaMA with SPAM / Stable-SPAM in JAX: run as ``python -m experiments.pretrain``."""
