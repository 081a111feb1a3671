"""Input pipeline: documents -> token rows -> per-step batches, resumable at the exact batch.

Sources (``--dataset``):
  * ``stdlib`` (the offline default): the ``.py`` files of the Python standard library this
    interpreter ships with, in sorted order, tests and codec tables left out; files are split
    into training and validation files, then into blank-line-separated blocks, one document
    each.
  * ``c4``: ``allenai/c4`` (``en``) streamed with Hugging Face ``datasets``, shuffled with the
    data seed (42 as in the papers), one shard per host (``split_dataset_by_node``).
  * a local path: ``.txt`` (one document per non-empty line, like the ``datasets`` text
    loader), ``.jsonl`` (a ``text`` field per line), ``.parquet`` (a ``text`` column), or a
    directory holding such files (read in sorted order).

Local and stdlib documents are shuffled once with the data seed and a held-out slice becomes
the validation set (a fixed, shuffled list); every epoch reshuffles the training documents
(seed + epoch). Each host
takes every ``num_hosts``-th document of that order.

Rows are ``max_length`` tokens. Without packing (the papers' setting) a document is truncated
or padded to one row; with packing documents are concatenated (each ends with the tokenizer's
end-of-document token) and cut into full rows. The loss ignores padding.

The loader's position is a small JSON-able dict (epoch, document, offset in the document), saved
with every checkpoint, so a resumed run reads exactly the batch the interrupted one would have.
"""
from __future__ import annotations

import json
import math
import pathlib
import re
import sysconfig
from collections.abc import Iterator, Sequence

import numpy as np

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Tests, third-party packages, and the codec tables of `encodings/` (mostly escaped
# code-point tables, 12% of the bytes) are left out of the demo corpus.
_STDLIB_SKIP = {"test", "tests", "idle_test", "lib2to3", "site-packages", "dist-packages",
                "encodings"}


# ----------------------------------------------------------------------------- documents
def stdlib_files() -> list[pathlib.Path]:
  """The standard library's ``.py`` files (see ``_STDLIB_SKIP``), sorted."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = [p for p in root.rglob("*.py") if not _STDLIB_SKIP & set(p.relative_to(root).parts)]
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_file(path: pathlib.Path) -> list[str]:
  if path.suffix == ".txt":
    return [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if line.strip()]
  if path.suffix == ".jsonl":
    docs = []
    with path.open(encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          record = json.loads(line)
          if "text" not in record:
            raise SystemExit(f"{path}:{n}: a .jsonl record needs a 'text' field")
          docs.append(record["text"])
    return docs
  if path.suffix == ".parquet":
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    table = pq.read_table(path, columns=None)
    if "text" not in table.column_names:
      raise SystemExit(f"{path}: a .parquet file needs a 'text' column")
    return [t for t in table.column("text").to_pylist() if t]
  raise SystemExit(f"{path}: unsupported file type (use {', '.join(LOCAL_SUFFIXES)})")


def paragraphs(docs: Sequence[str]) -> list[str]:
  """Blocks separated by blank lines (top-level functions and classes, in source code)."""
  out = []
  for doc in docs:
    out.extend(p for p in re.split(r"\n\s*\n", doc) if p.strip())
  return out


def local_files(path: str) -> list[pathlib.Path]:
  """The data files named by ``path`` (a file or a directory), or a one-line error."""
  p = pathlib.Path(path)
  if not p.exists():
    raise SystemExit(f"--dataset {path}: no such file or directory")
  if p.is_dir():
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in LOCAL_SUFFIXES)
    if not files:
      raise SystemExit(f"--dataset {path}: no {', '.join(LOCAL_SUFFIXES)} files in the directory")
    return files
  if p.suffix not in LOCAL_SUFFIXES:
    raise SystemExit(f"--dataset {path}: unsupported file type (use {', '.join(LOCAL_SUFFIXES)})")
  return [p]


def read_documents(dataset: str) -> list[str]:
  """All documents of a local dataset (``stdlib`` or a path), in a fixed order."""
  if dataset == "stdlib":
    return [f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files()]
  docs = []
  for f in local_files(dataset):
    docs.extend(_read_file(f))
  if not docs:
    raise SystemExit(f"--dataset {dataset}: no documents found")
  return docs


def split_documents(docs: Sequence[str], val_fraction: float, seed: int):
  """(train, validation): a seeded shuffle, then the last ``val_fraction`` is held out."""
  order = np.random.default_rng(seed).permutation(len(docs))
  n_val = max(1, math.ceil(val_fraction * len(docs))) if len(docs) > 1 else 0
  train = [docs[i] for i in order[:len(docs) - n_val]]
  val = [docs[i] for i in order[len(docs) - n_val:]] or list(docs)
  return train, val


class LocalDocuments:
  """An endless, reshuffled-per-epoch walk over in-memory documents, for one host."""

  def __init__(self, docs: Sequence[str], *, seed: int, shuffle: bool = True,
               host: int = 0, num_hosts: int = 1, repeat: bool = True):
    if len(docs) < num_hosts:
      raise SystemExit(f"{len(docs)} documents cannot be split over {num_hosts} hosts")
    self.docs, self.seed, self.shuffle, self.repeat = docs, seed, shuffle, repeat
    self.host, self.num_hosts = host, num_hosts
    self.epoch, self.pos = 0, 0
    self._order = self._epoch_order(0)

  def _epoch_order(self, epoch: int) -> np.ndarray:
    n = len(self.docs)
    order = (np.random.default_rng(self.seed + epoch).permutation(n) if self.shuffle
             else np.arange(n))
    return order[self.host::self.num_hosts]

  def current(self) -> str | None:
    if self.pos >= len(self._order):
      return None
    return self.docs[self._order[self.pos]]

  def advance(self) -> None:
    self.pos += 1
    if self.pos >= len(self._order) and self.repeat:
      self.epoch, self.pos = self.epoch + 1, 0
      self._order = self._epoch_order(self.epoch)

  def state_dict(self) -> dict:
    return {"epoch": int(self.epoch), "doc": int(self.pos)}

  def load_state_dict(self, state: dict) -> None:
    self.epoch, self.pos = int(state["epoch"]), int(state["doc"])
    self._order = self._epoch_order(self.epoch)


class StreamingDocuments:
  """A Hugging Face streaming dataset (C4) behind the same interface as :class:`LocalDocuments`.

  Its position is the dataset's own ``state_dict()`` (``datasets`` >= 2.18) taken before the
  current document; older versions fall back to counting documents and ``skip``-ping them.
  """

  def __init__(self, make_dataset, text_field: str = "text"):
    self._make = make_dataset
    self.text_field = text_field
    self._ds = make_dataset()
    self._count = 0
    self._restart(None)

  def _restart(self, state) -> None:
    ds = self._ds
    if state is not None and state.get("hf") is not None:
      ds.load_state_dict(state["hf"])
    elif state is not None:
      ds = ds.skip(int(state["doc"]))
    self._it = iter(ds)
    self._fetch()

  def _fetch(self) -> None:
    self._before = self._ds.state_dict() if hasattr(self._ds, "state_dict") else None
    try:
      self._doc = next(self._it)[self.text_field]
    except StopIteration:
      self._doc = None

  def current(self) -> str | None:
    return self._doc

  def advance(self) -> None:
    self._count += 1
    self._fetch()

  def state_dict(self) -> dict:
    return {"doc": self._count, "hf": self._before}

  def load_state_dict(self, state: dict) -> None:
    self._ds = self._make()
    self._count = int(state["doc"])
    self._restart(state)


def c4_documents(split: str, *, seed: int, host: int, num_hosts: int) -> StreamingDocuments:
  """``allenai/c4`` ``en`` streamed, shuffled with ``seed``, this host's shard."""
  try:
    import datasets  # pylint: disable=import-outside-toplevel
    from datasets.distributed import split_dataset_by_node  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit("--dataset c4 needs the optional 'datasets' package "
                     "(and internet access): pip install -e '.[c4]'") from e

  def make():
    ds = datasets.load_dataset("allenai/c4", "en", split=split, streaming=True)
    ds = ds.shuffle(seed=seed)
    if num_hosts > 1:
      ds = split_dataset_by_node(ds, rank=host, world_size=num_hosts)
    return ds

  return StreamingDocuments(make)


# ----------------------------------------------------------------------------- token rows
class RowBatcher:
  """Turns a document walk into rows of ``max_length`` token ids, with a resumable position."""

  def __init__(self, documents, tokenizer, *, max_length: int, packing: bool):
    self.documents, self.tokenizer = documents, tokenizer
    self.max_length, self.packing = max_length, packing
    self.offset = 0  # tokens of the current document already emitted (packing only)
    self._tokens = None

  def _current_tokens(self):
    if self._tokens is None:
      text = self.documents.current()
      if text is None:
        return None
      cut = None if self.packing else self.max_length
      self._tokens = np.asarray(self.tokenizer.encode(text, max_length=cut), dtype=np.int32)
    return self._tokens

  def _advance(self) -> None:
    self.documents.advance()
    self._tokens, self.offset = None, 0

  def next_row(self) -> np.ndarray | None:
    """One row of ``max_length`` ids, or None when a non-repeating walk is exhausted."""
    row = np.full((self.max_length,), self.tokenizer.pad_id, dtype=np.int32)
    if not self.packing:
      tokens = self._current_tokens()
      if tokens is None:
        return None
      n = min(len(tokens), self.max_length)
      row[:n] = tokens[:n]
      self._advance()
      return row
    filled = 0
    while filled < self.max_length:
      tokens = self._current_tokens()
      if tokens is None:
        return row if filled else None
      take = tokens[self.offset:self.offset + self.max_length - filled]
      row[filled:filled + len(take)] = take
      filled += len(take)
      self.offset += len(take)
      if self.offset >= len(tokens):
        self._advance()
    return row

  def state_dict(self) -> dict:
    return {**self.documents.state_dict(), "offset": int(self.offset)}

  def load_state_dict(self, state: dict) -> None:
    self.documents.load_state_dict(state)
    self._tokens, self.offset = None, int(state.get("offset", 0))


class TrainLoader:
  """Per optimizer step: an int32 array ``(accum_steps, rows_per_host, max_length)``."""

  def __init__(self, batcher: RowBatcher, *, accum_steps: int, rows_per_host: int):
    self.batcher, self.accum_steps, self.rows_per_host = batcher, accum_steps, rows_per_host

  def next_batch(self) -> np.ndarray:
    rows = [self.batcher.next_row() for _ in range(self.accum_steps * self.rows_per_host)]
    if any(r is None for r in rows):
      raise RuntimeError("the training data ran out")
    return np.stack(rows).reshape(self.accum_steps, self.rows_per_host, -1)

  def __iter__(self) -> Iterator[np.ndarray]:
    while True:
      yield self.next_batch()

  def state_dict(self) -> dict:
    return self.batcher.state_dict()

  def load_state_dict(self, state: dict) -> None:
    self.batcher.load_state_dict(state)


def eval_batches(batcher: RowBatcher, *, rows_per_host: int, max_tokens: int,
                 max_batches: int | None = None) -> list[np.ndarray]:
  """A fixed validation set: batches until ``max_tokens`` non-pad tokens (per host) are read.

  A last partial batch is dropped so every batch has the same shape (one compilation).
  """
  batches, seen = [], 0
  pad = batcher.tokenizer.pad_id
  while seen < max_tokens and (max_batches is None or len(batches) < max_batches):
    rows = []
    for _ in range(rows_per_host):
      row = batcher.next_row()
      if row is None:
        break
      rows.append(row)
    if len(rows) < rows_per_host:
      break
    batch = np.stack(rows)
    batches.append(batch)
    seen += int((batch != pad).sum())
  if not batches:
    raise SystemExit("the validation split is too small for one evaluation batch "
                     "(lower --batch_size or add documents)")
  return batches


# ----------------------------------------------------------------------------- assembly
def make_loaders(cfg, tokenizer, *, host: int, num_hosts: int):
  """(train loader, validation batches) for a resolved :class:`experiments.config.TrainConfig`."""
  rows_per_host = cfg.batch_size // num_hosts
  if cfg.dataset == "c4":
    train_docs = c4_documents("train", seed=cfg.data_seed, host=host, num_hosts=num_hosts)
    val_docs = c4_documents("validation", seed=cfg.data_seed, host=host, num_hosts=num_hosts)
  else:
    docs = read_documents(cfg.dataset)
    if cfg.eval_dataset:
      train, val = docs, read_documents(cfg.eval_dataset)
    else:
      train, val = split_documents(docs, cfg.val_fraction, cfg.data_seed)
    if cfg.dataset == "stdlib":
      # Whole files would fill a packed batch with consecutive chunks of one or two files;
      # their blank-line-separated blocks, shuffled, give varied batches. Validation files
      # stay apart from training files.
      train, val = paragraphs(train), paragraphs(val)
    train_docs = LocalDocuments(train, seed=cfg.data_seed, host=host, num_hosts=num_hosts)
    val_docs = LocalDocuments(val, seed=cfg.data_seed, repeat=False,
                              host=host, num_hosts=num_hosts)
  train = TrainLoader(
      RowBatcher(train_docs, tokenizer, max_length=cfg.max_length, packing=cfg.packing),
      accum_steps=cfg.accum_steps, rows_per_host=rows_per_host)
  val = eval_batches(
      RowBatcher(val_docs, tokenizer, max_length=cfg.max_length, packing=cfg.packing),
      rows_per_host=rows_per_host, max_tokens=cfg.eval_tokens // num_hosts,
      max_batches=cfg.eval_batches)
  return train, val
