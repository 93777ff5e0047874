"""Tests for raw-id vocabularies (csctr.data.vocab)."""

import collections

import numpy as np
import pytest

from csctr.data import vocab as vocab_lib


def _counts(seed=0, n=500):
  rng = np.random.default_rng(seed)
  return collections.Counter(f"u{x}" for x in rng.zipf(1.5, n) % 97)


def test_rows_follow_counts_and_min_count_sends_rare_ids_to_oov():
  counts = _counts()
  v = vocab_lib.Vocabulary.build("user_id", counts, min_count=3)
  kept = {k for k, c in counts.items() if c >= 3}
  assert set(v.ids) == kept and v.size == len(kept) + 1
  assert v.oov_count == sum(c for c in counts.values() if c < 3)
  # Most frequent first, ties by id: a numpy reference ordering.
  order = sorted(kept, key=lambda k: (-counts[k], k))
  np.testing.assert_array_equal(v.lookup(order), np.arange(1, len(order) + 1))
  rare = [k for k, c in counts.items() if c < 3]
  assert rare and (v.lookup(rare) == vocab_lib.OOV_ROW).all()
  assert v.row("never-seen") == vocab_lib.OOV_ROW
  assert v.row(17) == v.row("17")  # raw ids are compared as strings


def test_hash_buckets_are_stable_and_inside_the_extra_rows():
  v = vocab_lib.Vocabulary.build("item_id", {"a": 5, "b": 1}, min_count=2,
                                 hash_buckets=8)
  unknown = [f"new{i}" for i in range(200)]
  rows = v.lookup(unknown)
  assert v.size == 1 + 1 + 8
  assert ((rows >= 2) & (rows < v.size)).all()
  assert len(set(rows.tolist())) == 8  # 200 ids spread over every bucket
  expected = [2 + vocab_lib.stable_hash(u, 8) for u in unknown]
  np.testing.assert_array_equal(rows, expected)


def test_save_load_round_trip_and_errors_name_the_line(tmp_path):
  v = vocab_lib.Vocabulary.build("user_id", _counts(1), min_count=2,
                                 hash_buckets=4)
  vocab_lib.save_vocabularies(str(tmp_path), {"user_id": v})
  back = vocab_lib.load_vocabularies(str(tmp_path))["user_id"]
  assert back.ids == v.ids and back.size == v.size
  assert (back.min_count, back.hash_buckets, back.oov_count) == (
      v.min_count, v.hash_buckets, v.oov_count)
  np.testing.assert_array_equal(back.counts, v.counts)
  probe = list(v.ids) + ["x", "y"]
  np.testing.assert_array_equal(back.lookup(probe), v.lookup(probe))
  path = vocab_lib.vocab_path(str(tmp_path), "user_id")
  lines = open(path).read().splitlines()
  lines[2] = "broken line"
  open(path, "w").write("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"user_id\.tsv:3:"):
    vocab_lib.Vocabulary.load(path)
  with pytest.raises(ValueError, match="tab"):
    vocab_lib.Vocabulary.build("f", {"a\tb": 3}).save(str(tmp_path / "f.tsv"))
  assert vocab_lib.load_vocabularies(str(tmp_path / "none")) == {}


def _canonical(values):
  """The reference: every value is what str(int) writes, inside int64.

  (+-(2^63 - 1) are left to the slow path: np.fromstring saturates to them.)
  """
  try:
    return all(str(int(v)) == v and abs(int(v)) < 2**63 - 1 for v in values)
  except ValueError:
    return False


def test_decimal_ids_parses_exactly_the_canonical_integers():
  rng = np.random.default_rng(0)
  odd = ["007", "+7", " 7", "7 ", "-0", "", "1 2", "1.5", "abc", "1\n",
         "\u0663", "9223372036854775807", "9999999999999999999",
         "99999999999999999999", "-9223372036854775807",
         "-9223372036854775808", "0x10"]
  for _ in range(3000):
    values = []
    for _ in range(rng.integers(0, 12)):
      if rng.random() < 0.1:
        values.append(odd[rng.integers(len(odd))])
      else:
        digits = int(rng.integers(1, 19))
        values.append(str(int(rng.integers(-10**digits, 10**digits))))
    got = vocab_lib.decimal_ids(values)
    if _canonical(values):
      assert got is not None and got.tolist() == [int(v) for v in values]
    else:
      assert got is None, values


@pytest.mark.parametrize("hash_buckets", [0, 5])
@pytest.mark.parametrize("ids", [["3", "10", "-4", "250"],
                                 ["3", "a", "10", "007"]])
def test_lookup_int_index_equals_the_row_by_row_rule(ids, hash_buckets):
  # "007" is kept as a string id: "7" must not find it, "007" must.
  counts = {k: i + 1 for i, k in enumerate(ids)}
  v = vocab_lib.Vocabulary.build("f", counts, hash_buckets=hash_buckets)
  queries = ["3", "10", "-4", "250", "7", "007", "a", "11", "99", "3"]
  for q in (queries, [q for q in queries if _canonical([q])]):
    np.testing.assert_array_equal(v.lookup(q), [v.row(x) for x in q])
