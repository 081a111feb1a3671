"""Where a run's parameters come from besides a fresh init: ``--init_from_hf`` and ``--eval_only``.

``--init_from_hf DIR`` starts training from a Hugging Face LLaMA directory (``config.json`` +
``model.safetensors``, e.g. one written by ``python -m experiments.export_hf``) with a fresh
optimizer state; without ``--model_config`` the model's shape is DIR's. ``--eval_only``
evaluates the parameters of ``--init_from_hf`` or, without it, of the latest checkpoint in
``--save_dir``, prints the validation loss and perplexity, and writes nothing.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

import models
from experiments import checkpointing, config, sharding
from experiments import train_step as ts
from spam_optax._tree_util import path_names


def read_init_params(cfg: config.TrainConfig, mcfg: models.LlamaConfig) -> dict | None:
  """``--init_from_hf``'s parameters as host arrays in the run's parameter dtype, or None.

  A checkpoint of another shape than the model is a one-line error naming the tensor.
  """
  if not cfg.init_from_hf:
    return None
  try:
    params, _ = models.load_pretrained(cfg.init_from_hf, mcfg, dtype=mcfg.param_dtype)
  except (ValueError, FileNotFoundError, KeyError) as e:
    hint = ""
    if "embed_tokens" in str(e) and cfg.tokenizer in ("bytes", "byte"):
      hint = (f" (--tokenizer bytes has {mcfg.vocab_size} ids: pass the model's own tokenizer "
              "with --tokenizer)")
    config.fail(f"--init_from_hf {cfg.init_from_hf}: {e}{hint}")
  return params


def place(params: dict, shardings) -> dict:
  """Host arrays -> global ``jax.Array``s laid out as ``shardings`` (every host holds all)."""
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]),
      params, shardings)


def _checkpoint_params(cfg: config.TrainConfig, mcfg: models.LlamaConfig):
  """(step, parameters) of the latest checkpoint in ``--save_dir``, checked against the model."""
  ckpt_dir = cfg.save_dir.rstrip("/") + "/checkpoints"
  if "://" not in cfg.save_dir and not os.path.isdir(ckpt_dir):
    config.fail(f"--eval_only needs --init_from_hf DIR or a --save_dir holding a checkpoint; "
                f"{cfg.save_dir} has none")
  ckpt = checkpointing.Checkpointer(cfg.save_dir, keep=cfg.keep_checkpoints)
  step = ckpt.latest_step()
  if step is None:
    ckpt.close()
    config.fail(f"--eval_only needs --init_from_hf DIR or a --save_dir holding a checkpoint; "
                f"{cfg.save_dir} has none")
  params = ckpt.restore_params(step)
  ckpt.close()
  mismatch = shape_mismatch(params, mcfg)
  if mismatch:
    config.fail(f"the checkpoint at step {step} in {cfg.save_dir} does not fit the model: "
                f"{mismatch}")
  return step, jax.tree.map(lambda x: x.astype(mcfg.param_dtype), params)


def shape_mismatch(params: dict, mcfg: models.LlamaConfig) -> str | None:
  """The first parameter of ``params`` missing or shaped unlike ``Llama(mcfg)``'s, or None."""
  expected = nn.meta.unbox(models.abstract_variables(mcfg)["params"])
  flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
    got = flat.get(path)
    if got is None or got.shape != leaf.shape:
      name = "/".join(path_names(path))
      return (f"{name} is {None if got is None else got.shape}, {mcfg.name} "
              f"needs {leaf.shape}")
  return None


def eval_only(cfg: config.TrainConfig, mcfg: models.LlamaConfig, quant, tok,
              sizes: dict[str, int], init_params: dict | None) -> dict:
  """Evaluates once and prints ``validation loss L, perplexity P``; no directory is written."""
  from experiments import pretrain  # pylint: disable=import-outside-toplevel  (a cycle)
  if init_params is None:
    step, params = _checkpoint_params(cfg, mcfg)
    source = f"{cfg.save_dir} at step {step}"
  else:
    step, params, source = None, init_params, cfg.init_from_hf
  with config.one_line_errors():  # an empty or unreadable dataset
    _, val_batches = pretrain.make_loaders(cfg, tok)
  if not val_batches:
    config.fail("--eval_only: the validation set is empty")
  mesh = sharding.make_mesh(sizes)
  rules = models.DEFAULT_LOGICAL_AXIS_RULES
  model = models.Llama(mcfg, quant=quant)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = models.abstract_variables(mcfg, quant, length=cfg.max_length)["params"]
    shardings = sharding.param_shardings(boxed, mesh, rules)
    replicated = NamedSharding(mesh, P())
    eval_step = jax.jit(ts.make_eval_step(model, pad_id=tok.pad_id),
                        in_shardings=(shardings, sharding.eval_batch_sharding(mesh), replicated),
                        out_shardings=replicated)
    result = pretrain.evaluate(eval_step, place(params, shardings), val_batches, mesh, cfg)
  if jax.process_index() == 0:
    print(f"{source}: validation loss {result['eval_loss']:.4f}, perplexity "
          f"{result['eval_perplexity']:.2f} ({len(val_batches)} batches of "
          f"{cfg.batch_size}x{cfg.max_length})", flush=True)
  return {"eval_only": True, "step": step, "source": source, **result}
