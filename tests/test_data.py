"""The input pipeline: file formats, rows, packing, host split, determinism, exact resume."""
import json

import numpy as np
import pytest

from experiments import config, data, tokenizer

TOK = tokenizer.ByteTokenizer()


def _docs(n=23):
  return [f"document {i}: " + "abcdefghij"[: (i % 7) + 1] * (i % 5 + 1) for i in range(n)]


def test_byte_tokenizer_round_trip():
  ids = TOK.encode("héllo")
  assert ids[-1] == TOK.eos_id and TOK.pad_id not in ids
  assert ids[:-1].min() >= TOK.offset and ids[:-1].max() < TOK.vocab_size
  assert TOK.decode(ids) == "héllo"
  assert TOK.vocab_size == 258


def test_local_formats_and_directory(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
  (tmp_path / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n\n"
                                    + json.dumps({"text": "again", "id": 3}) + "\n")
  pq.write_table(pa.table({"text": ["from parquet", ""]}), tmp_path / "c.parquet")
  (tmp_path / "ignored.csv").write_text("x,y\n")
  assert data.read_documents(str(tmp_path)) == [
      "first line", "second line", "from jsonl", "again", "from parquet"]
  assert data.read_documents(str(tmp_path / "b.jsonl")) == ["from jsonl", "again"]


@pytest.mark.parametrize("make_bad, message", [
    (lambda p: p / "missing", "no such file"),
    (lambda p: (p / "x.csv").write_text("a") and p / "x.csv", "unsupported"),
    (lambda p: (p / "x.jsonl").write_text('{"body": 1}\n') and p / "x.jsonl", "'text' field"),
    (lambda p: p, "no .txt"),
])
def test_bad_local_data_is_a_one_line_error(tmp_path, make_bad, message):
  path = make_bad(tmp_path)
  with pytest.raises(SystemExit, match=message):
    data.read_documents(str(path))


def test_rows_truncate_and_pad():
  docs = data.LocalDocuments(["ab", "x" * 50], seed=0, shuffle=False, repeat=False)
  batcher = data.RowBatcher(docs, TOK, max_length=8, packing=False)
  short, long = batcher.next_row(), batcher.next_row()
  np.testing.assert_array_equal(short, [ord("a") + 2, ord("b") + 2, TOK.eos_id, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(long, [ord("x") + 2] * 8)
  assert batcher.next_row() is None


def test_packing_keeps_every_token_in_order():
  docs = _docs(9)
  walk = data.LocalDocuments(docs, seed=0, shuffle=False, repeat=False)
  batcher = data.RowBatcher(walk, TOK, max_length=16, packing=True)
  rows = []
  while (row := batcher.next_row()) is not None:
    rows.append(row)
  stream = np.concatenate(rows)
  expected = np.concatenate([TOK.encode(d) for d in docs])
  np.testing.assert_array_equal(stream[:len(expected)], expected)
  assert (stream[len(expected):] == TOK.pad_id).all()  # only the last row is padded


def test_host_shards_are_disjoint_and_complete():
  docs = _docs(10)
  seen = []
  for host in range(3):
    walk = data.LocalDocuments(docs, seed=5, host=host, num_hosts=3, repeat=False)
    while walk.current() is not None:
      seen.append(walk.current())
      walk.advance()
  assert sorted(seen) == sorted(docs)


def test_epochs_reshuffle_deterministically():
  def order(seed, n=12):
    walk = data.LocalDocuments(_docs(6), seed=seed)
    out = []
    for _ in range(n):
      out.append(walk.current())
      walk.advance()
    return out
  first = order(1)
  assert first == order(1)
  assert first[:6] != first[6:] and sorted(first[:6]) == sorted(first[6:])
  assert first != order(2)


@pytest.mark.parametrize("packing", [False, True])
def test_resume_reads_exactly_the_next_batches(packing):
  def loader():
    walk = data.LocalDocuments(_docs(), seed=3)
    return data.TrainLoader(data.RowBatcher(walk, TOK, max_length=12, packing=packing),
                            accum_steps=2, rows_per_host=3)
  reference = loader()
  batches = [reference.next_batch() for _ in range(9)]  # crosses several epochs
  interrupted = loader()
  for _ in range(4):
    interrupted.next_batch()
  state = json.loads(json.dumps(interrupted.state_dict()))  # as stored in a checkpoint
  resumed = loader()
  resumed.load_state_dict(state)
  for expected in batches[4:]:
    np.testing.assert_array_equal(resumed.next_batch(), expected)
  assert batches[0].shape == (2, 3, 12)


def test_split_and_eval_batches_are_fixed():
  train, val = data.split_documents(_docs(50), 0.1, seed=42)
  assert len(val) == 5 and not set(train) & set(val) and len(train) == 45
  def batches():
    walk = data.LocalDocuments(val, seed=0, shuffle=False, repeat=False)
    return data.eval_batches(data.RowBatcher(walk, TOK, max_length=8, packing=True),
                             rows_per_host=2, max_tokens=40)
  a, b = batches(), batches()
  assert len(a) >= 2 and all(x.shape == (2, 8) for x in a)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_make_loaders_from_a_jsonl_file(tmp_path):
  path = tmp_path / "corpus.jsonl"
  path.write_text("".join(json.dumps({"text": d * 3}) + "\n" for d in _docs(40)))
  cfg = config.parse_args(["--dataset", str(path), "--batch_size", "4", "--max_length", "16",
                           "--total_batch_size", "8", "--eval_tokens", "100",
                           "--val_fraction", "0.25"])
  assert cfg.tokenizer == "bytes" and cfg.packing is False
  train, val = data.make_loaders(cfg, TOK, host=0, num_hosts=1)
  assert train.next_batch().shape == (2, 4, 16)
  assert val and val[0].shape == (4, 16)


def test_stdlib_corpus_is_sorted_and_offline():
  files = data.stdlib_files()
  assert len(files) > 100 and all(f.suffix == ".py" for f in files)
  assert not any("test" in f.parts or "site-packages" in f.parts for f in files)
