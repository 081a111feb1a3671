"""The ``--dataset c4`` path, offline: fake ``datasets`` / ``transformers`` modules in sys.modules.

The fakes record what the experiments code asks for (dataset name, config, split, streaming,
shuffle seed, per-host split) and serve a small deterministic corpus through a word-level
tokenizer with T5's special ids (pad 0, ``</s>`` 1, unknown 2), so the real loader, loss and
training loop run as they would on C4.
"""
import json
import math
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from experiments import config, data, pretrain, tokenizer
from experiments import train_step as ts

WORDS = [f"w{i}" for i in range(100)]
PAD, EOS, UNK = 0, 1, 2
VOCAB = {w: i + 3 for i, w in enumerate(WORDS)}


def _train_doc(i):  # 1..45 words: some fit a row, some are cut
  return " ".join(WORDS[(3 * i + k) % 50] for k in range(1 + (13 * i) % 45))


def _val_doc(i):  # words w50..w99 only: validation rows are recognisable
  return " ".join(WORDS[50 + (7 * i + k) % 50] for k in range(2 + (5 * i) % 30))


SPLITS = {"train": [_train_doc(i) for i in range(240)],
          "validation": [_val_doc(i) for i in range(60)]}


def encode(text, max_length=None):
  """What the fake tokenizer returns: ids + ``</s>``; cut keeping ``</s>`` last, like T5."""
  ids = [VOCAB.get(w, UNK) for w in text.split()] + [EOS]
  if max_length is not None and len(ids) > max_length:
    ids = ids[:max_length - 1] + [EOS]
  return ids


# ----------------------------------------------------------------------------- the fakes
class FakeIterableDataset:
  """A streaming dataset: a list of records in an order, resumable via state_dict."""

  def __init__(self, records, calls, *, split, order=None, stateful=True):
    self.records, self.calls, self.split = records, calls, split
    self.order = list(range(len(records))) if order is None else order
    self.stateful = stateful
    self._state = {"examples_yielded": 0}

  def _derive(self, order):
    return FakeIterableDataset(self.records, self.calls, split=self.split, order=order,
                               stateful=self.stateful)

  def shuffle(self, seed=None, buffer_size=1000, generator=None):
    self.calls.append(("shuffle", self.split, seed, buffer_size))
    perm = np.random.default_rng(seed).permutation(len(self.order))
    return self._derive([self.order[i] for i in perm])

  def skip(self, n):
    self.calls.append(("skip", self.split, n))
    return self._derive(self.order[n:])

  def __iter__(self):
    start = self._state["examples_yielded"]
    for idx in self.order[start:]:
      self._state["examples_yielded"] += 1  # as in datasets: counted before the yield
      self.calls.append(("yield", self.split, idx))
      yield dict(self.records[idx])

  def __getattr__(self, name):  # state_dict / load_state_dict only when "datasets >= 2.18"
    if name in ("state_dict", "load_state_dict") and self.__dict__.get("stateful"):
      return getattr(self, "_" + name)
    raise AttributeError(name)

  def _state_dict(self):
    return dict(self._state)

  def _load_state_dict(self, state):
    self.calls.append(("load_state_dict", self.split, dict(state)))
    self._state = dict(state)


def make_fake_datasets(calls, *, stateful=True):
  mod = types.ModuleType("datasets")
  dist = types.ModuleType("datasets.distributed")

  def load_dataset(path, name=None, split=None, streaming=False, **kwargs):
    calls.append(("load_dataset", path, name, split, streaming))
    if (path, name) != ("allenai/c4", "en") or split not in SPLITS or not streaming:
      raise ValueError(f"the fake serves streaming allenai/c4 en only, got {path} {name} {split}")
    records = [{"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{split}/{i}"}
               for i, t in enumerate(SPLITS[split])]
    return FakeIterableDataset(records, calls, split=split, stateful=stateful)

  def split_dataset_by_node(dataset, rank, world_size):
    calls.append(("split_dataset_by_node", dataset.split, rank, world_size))
    return dataset._derive(dataset.order[rank::world_size])  # datasets: 1 example in world_size

  mod.load_dataset, mod.IterableDataset = load_dataset, FakeIterableDataset
  dist.split_dataset_by_node = split_dataset_by_node
  mod.distributed = dist
  return mod, dist


class FakeT5Tokenizer:
  pad_token_id, eos_token_id, unk_token_id = PAD, EOS, UNK

  def __len__(self):
    return 3 + len(WORDS)

  def __call__(self, text, max_length=None, truncation=False, add_special_tokens=True, **kw):
    assert not kw.get("padding"), "rows are padded by the batcher, not the tokenizer"
    ids = encode(text, max_length if truncation else None)
    if not add_special_tokens:
      ids = ids[:-1]
    return {"input_ids": ids, "attention_mask": [1] * len(ids)}

  def decode(self, ids, skip_special_tokens=False):
    inverse = {v: k for k, v in VOCAB.items()}
    return " ".join(inverse[i] for i in ids if i in inverse)


class _Calls(list):
  """The calls the fakes saw, in order."""


@pytest.fixture
def fake_c4(monkeypatch):
  """Installs the fakes for one test; returns the list of calls they saw."""
  calls = _Calls()

  def install(stateful=True):
    mod, dist = make_fake_datasets(calls, stateful=stateful)
    monkeypatch.setitem(sys.modules, "datasets", mod)
    monkeypatch.setitem(sys.modules, "datasets.distributed", dist)
    return calls

  transformers = types.ModuleType("transformers")

  class AutoTokenizer:
    @staticmethod
    def from_pretrained(name, **kwargs):
      calls.append(("from_pretrained", name))
      return FakeT5Tokenizer()

  transformers.AutoTokenizer = AutoTokenizer
  monkeypatch.setitem(sys.modules, "transformers", transformers)
  install()
  calls.reinstall = install  # for the pre-2.18 variant without state_dict
  return calls


def c4_config(*extra):
  return config.parse_args(["--dataset", "c4", "--batch_size", "4", "--max_length", "16",
                            "--eval_tokens", "120", *extra])


def yielded(calls, split):
  return [c[2] for c in calls if c[0] == "yield" and c[1] == split]


# ----------------------------------------------------------------------------- tests
def test_requests_allenai_c4_en_streaming_shuffled_with_seed_42(fake_c4):
  cfg = c4_config()
  assert (cfg.tokenizer, cfg.packing, cfg.data_seed) == ("t5-base", False, 42)
  assert config.parse_args(["--dataset", "c4"]).eval_tokens == 10_000_000
  tok = tokenizer.get_tokenizer(cfg.tokenizer)
  assert ("from_pretrained", "t5-base") in fake_c4
  assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (PAD, EOS, 103)
  data.make_loaders(cfg, tok, host=0, num_hosts=1)
  setup = [c for c in fake_c4 if c[0] in ("load_dataset", "shuffle", "split_dataset_by_node")]
  assert ("load_dataset", "allenai/c4", "en", "train", True) in setup
  assert ("load_dataset", "allenai/c4", "en", "validation", True) in setup
  assert {c[1:3] for c in setup if c[0] == "shuffle"} == {("train", 42), ("validation", 42)}
  assert not any(c[0] == "split_dataset_by_node" for c in setup)  # one host: no split
  cfg7 = c4_config("--data_seed", "7")
  data.make_loaders(cfg7, tok, host=0, num_hosts=1)
  assert ("shuffle", "train", 7) in [c[:3] for c in fake_c4]


def test_each_host_reads_its_own_shard_after_the_shuffle(fake_c4):
  cfg = c4_config("--batch_size", "8")
  tok = tokenizer.get_tokenizer(cfg.tokenizer)
  one, _ = data.make_loaders(cfg, tok, host=0, num_hosts=1)
  first = one.next_batch()[0]
  hosts = []
  for host in (0, 1):
    del fake_c4[:]
    train, val = data.make_loaders(cfg, tok, host=host, num_hosts=2)
    splits = [c for c in fake_c4 if c[0] in ("shuffle", "split_dataset_by_node")]
    for split in ("train", "validation"):
      mine = [c for c in splits if c[1] == split]
      assert [c[0] for c in mine] == ["shuffle", "split_dataset_by_node"]  # shuffle, then split
      assert mine[1][2:] == (host, 2)  # rank, world_size
    batch = train.next_batch()
    assert batch.shape == (1, 4, 16) and val[0].shape == (4, 16)  # rows per host = 8 / 2
    hosts.append(batch[0])
  # The two hosts' rows are disjoint and together are the single-host batch.
  as_set = lambda rows: {tuple(r) for r in rows}
  assert not as_set(hosts[0]) & as_set(hosts[1])
  assert as_set(hosts[0]) | as_set(hosts[1]) == as_set(first)


def test_rows_are_truncated_or_padded_and_padding_is_out_of_the_loss(fake_c4):
  cfg = c4_config("--batch_size", "8")
  tok = tokenizer.get_tokenizer(cfg.tokenizer)
  train, _ = data.make_loaders(cfg, tok, host=0, num_hosts=1)  # reads a document ahead
  batch = train.next_batch()
  assert batch.shape == (1, 8, 16) and batch.dtype == np.int32
  docs = [SPLITS["train"][i] for i in yielded(fake_c4, "train")][:8]
  assert len(docs) == 8
  lengths = [len(encode(d)) for d in docs]
  assert min(lengths) < 16 < max(lengths)  # the batch holds both kinds
  for row, doc in zip(batch[0], docs):
    ids = encode(doc)
    if len(ids) >= 16:  # cut like T5's truncation=True: the row ends with </s>
      np.testing.assert_array_equal(row, ids[:15] + [EOS])
    else:
      np.testing.assert_array_equal(row, ids + [PAD] * (16 - len(ids)))

  # The loss is the mean over real next tokens only: recompute it from the logits.
  tiny = models.get_config("llama_9m").replace(vocab_size=128, hidden_size=32,
                                               intermediate_size=64, num_heads=2, num_layers=1,
                                               dtype="float32", param_dtype="float32")
  model = models.Llama(tiny)
  tokens = jnp.asarray(batch[0])
  # Compiled: op by op, the model's operations are dispatched one at a time (seconds).
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
  loss = float(jax.jit(lambda p: ts.lm_loss(model, p, tokens, tok.pad_id, jax.random.key(1)))(
      params))
  logp = jax.nn.log_softmax(jax.jit(model.apply)({"params": params}, tokens)[:, :-1], axis=-1)
  targets = np.asarray(tokens[:, 1:])
  nll = -np.take_along_axis(np.asarray(logp), targets[..., None], axis=-1)[..., 0]
  real = targets != PAD
  assert 0 < real.sum() < real.size
  np.testing.assert_allclose(loss, nll[real].mean(), rtol=1e-5)
  assert not math.isclose(loss, nll.mean(), rel_tol=1e-3)  # padding would change it


def test_packing_concatenates_whole_documents(fake_c4):
  cfg = c4_config("--packing")
  tok = tokenizer.get_tokenizer(cfg.tokenizer)
  train, _ = data.make_loaders(cfg, tok, host=0, num_hosts=1)  # reads a document ahead
  rows = np.concatenate([train.next_batch().reshape(-1) for _ in range(3)])
  assert PAD not in rows
  stream = [t for i in yielded(fake_c4, "train") for t in encode(SPLITS["train"][i])]
  assert len(stream) >= len(rows)
  np.testing.assert_array_equal(rows, stream[:len(rows)])  # no truncation, EOS between docs
  assert any(len(encode(SPLITS["train"][i])) > 16 for i in yielded(fake_c4, "train"))


def test_validation_is_a_fixed_slice_of_the_validation_split(fake_c4):
  cfg = c4_config()
  tok = tokenizer.get_tokenizer(cfg.tokenizer)
  train, val = data.make_loaders(cfg, tok, host=0, num_hosts=1)
  for _ in range(3):
    train.next_batch()
  _, again = data.make_loaders(cfg, tok, host=0, num_hosts=1)
  assert len(val) == len(again) > 1
  for a, b in zip(val, again):
    np.testing.assert_array_equal(a, b)
  tokens = np.concatenate([b.reshape(-1) for b in val])
  real = tokens[tokens != PAD]
  assert set(real.tolist()) <= {EOS} | {VOCAB[w] for w in WORDS[50:]}  # validation docs only
  non_pad = [int((b != PAD).sum()) for b in val]
  assert sum(non_pad[:-1]) < 120 <= sum(non_pad)  # stops once --eval_tokens are read
  # The slice is the start of the shuffled validation split, in order.
  first = data.c4_documents("validation", seed=42, host=0, num_hosts=1)
  expected = []
  for _ in range(4):
    ids = encode(first.current(), 16)
    expected.append(ids + [PAD] * (16 - len(ids)))
    first.advance()
  np.testing.assert_array_equal(val[0], expected)
  capped = data.make_loaders(c4_config("--eval_batches", "1"), tok, host=0, num_hosts=1)[1]
  assert len(capped) == 1


@pytest.mark.parametrize("stateful", [True, False], ids=["state_dict", "skip"])
def test_loader_position_resumes_at_the_same_batch(fake_c4, stateful):
  fake_c4.reinstall(stateful=stateful)
  cfg = c4_config()
  tok = tokenizer.get_tokenizer(cfg.tokenizer)
  train, _ = data.make_loaders(cfg, tok, host=0, num_hosts=1)
  for _ in range(2):
    train.next_batch()
  state = json.loads(json.dumps(train.state_dict()))  # what the checkpoint stores
  assert state["doc"] == 8 and (state["hf"] is not None) == stateful
  expected = [train.next_batch() for _ in range(2)]
  resumed, _ = data.make_loaders(cfg, tok, host=0, num_hosts=1)
  resumed.load_state_dict(state)
  for want in expected:
    np.testing.assert_array_equal(resumed.next_batch(), want)
  assert any(c[0] == ("load_state_dict" if stateful else "skip") for c in fake_c4)


def test_pretrain_runs_on_c4_end_to_end_and_resumes(fake_c4, tmp_path):
  model = tmp_path / "tiny.json"
  model.write_text(json.dumps({"hidden_size": 32, "intermediate_size": 64,
                               "num_attention_heads": 2, "num_hidden_layers": 2,
                               "vocab_size": 128, "max_sequence_length": 64}))

  def run(save, *extra):
    return pretrain.main([
        "--dataset", "c4", "--model_config", str(model), "--batch_size", "4",
        "--max_length", "32", "--num_training_steps", "3", "--warmup_steps", "1",
        "--lr", "1e-2", "--eval_every", "3", "--save_every", "3", "--eval_tokens", "200",
        "--dtype", "float32", "--optimizer", "spam", "--no-progress",
        "--save_dir", str(tmp_path / save), *extra])

  summary = run("run")
  assert ("from_pretrained", "t5-base") in fake_c4
  assert ("load_dataset", "allenai/c4", "en", "train", True) in fake_c4
  assert ("load_dataset", "allenai/c4", "en", "validation", True) in fake_c4
  # 3 steps x 4 rows, one document per row, and the next one read ahead.
  assert len(yielded(fake_c4, "train")) == 13
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert (saved["tokenizer"], saved["packing"], saved["data_seed"]) == ("t5-base", False, 42)
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in evals] == [0, 3]
  assert evals[0]["eval_loss"] == pytest.approx(math.log(128), abs=0.3)  # ~uniform at init
  assert summary["latest_checkpoint"] == 3

  # Interrupted after step 2 and resumed: the stream continues from the saved position.
  run("cut", "--stop_after", "2")
  resumed = run("cut")
  assert resumed["start_step"] == 2
  assert ("load_state_dict", "train", {"examples_yielded": 8}) in fake_c4
  cut = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").open()]
  np.testing.assert_allclose([r["loss"] for r in cut if "loss" in r], losses, rtol=1e-6)


def test_ids_past_the_model_vocabulary_become_unk(fake_c4):
  # t5-base's sentinel ids (32000..32099) lie past the papers' 32000-row embedding.
  text = "w0 w60 w99 w10"
  tok = tokenizer.get_tokenizer("t5-base", vocab_limit=50)
  ids = [VOCAB["w0"], UNK, UNK, VOCAB["w10"], EOS]
  assert tok.encode(text) == ids
  assert tok.encode(text, max_length=3) == [VOCAB["w0"], UNK, EOS]
  assert tokenizer.get_tokenizer("t5-base").encode(text) == encode(text)
