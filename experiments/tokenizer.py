"""Tokenizers: a byte-level one that needs no download, and the papers' T5 tokenizer.

Both expose the same small surface: ``encode(text) -> int ids`` (with the end-of-document
token appended), ``decode(ids)``, ``vocab_size``, ``pad_id`` and ``eos_id``. The loss ignores
``pad_id``.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes shifted by two: 0 is padding, 1 ends a document, byte b is b + 2."""

  pad_id: int = 0
  eos_id: int = 1
  offset: int = 2
  name: str = "bytes"

  @property
  def vocab_size(self) -> int:
    return 256 + self.offset

  def encode(self, text: str, max_length: int | None = None) -> np.ndarray:
    del max_length  # rows are cut by the batcher
    data = np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8)
    return np.append(data.astype(np.int32) + self.offset, np.int32(self.eos_id))

  def decode(self, ids) -> str:
    data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset)
    return data.decode("utf-8", errors="replace")


class HFTokenizer:
  """A Hugging Face tokenizer (``t5-base`` in the papers), which appends ``</s>`` itself."""

  def __init__(self, name: str, vocab_limit: int | None = None):
    try:
      import transformers  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise SystemExit(
          f"--tokenizer {name} needs the optional 'transformers' and 'sentencepiece' packages: "
          "pip install -e '.[c4]'") from e
    self.name = name
    self._tok = transformers.AutoTokenizer.from_pretrained(name)
    self.pad_id = int(self._tok.pad_token_id)
    self.eos_id = int(self._tok.eos_token_id)
    # t5-base has 32100 ids (100 sentinels, <extra_id_N>, above the papers' 32000-row
    # embedding). An id past the embedding would read NaN in JAX's gather and stop the run;
    # such ids become <unk> instead.
    self.vocab_limit = vocab_limit
    unk = self._tok.unk_token_id
    self.unk_id = int(unk) if unk is not None else self.pad_id

  @property
  def vocab_size(self) -> int:
    return len(self._tok)

  def encode(self, text: str, max_length: int | None = None) -> list[int]:
    """With ``max_length``, truncates like the official preprocessing
    (``truncation=True``), which keeps ``</s>`` as the last token of a cut document."""
    if max_length:
      ids = list(self._tok(text, max_length=max_length, truncation=True)["input_ids"])
    else:
      ids = list(self._tok(text, add_special_tokens=True)["input_ids"])
      if not ids or ids[-1] != self.eos_id:
        ids.append(self.eos_id)
    if self.vocab_limit is not None:
      ids = [i if i < self.vocab_limit else self.unk_id for i in ids]
    return ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def get_tokenizer(name: str, vocab_limit: int | None = None):
  """``bytes`` -> :class:`ByteTokenizer`; anything else is a Hugging Face tokenizer name/path
  (ids at or above ``vocab_limit``, the model's vocabulary, are mapped to ``<unk>``)."""
  if name in ("bytes", "byte"):
    return ByteTokenizer()
  return HFTokenizer(name, vocab_limit=vocab_limit)
