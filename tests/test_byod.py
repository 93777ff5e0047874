"""Tests for the BYOD loader (csctr.data.byod): mapping, splits, bad input."""

import csv
import io
import os
import pathlib

import numpy as np
from PIL import Image
import pytest

from configs import default
from csctr.data import byod
from csctr.data import image_io

SIZE = 8
IMP_HEADER = ("user_id", "item_id", "label", "timestamp", "device",
              "behavior")
# (user, item, label, timestamp, device, behavior). Timestamps are out of
# file order on purpose; the latest 20% (ts 9, 10) are test: rows 3 and 8.
IMPRESSIONS = [
    ("u1", "a", "1", "1", "mobile", ""),
    ("u2", "b", "0", "2", "desktop", "a"),
    ("u1", "c", "1", "3", "mobile", "a"),
    ("u4", "d", "1", "9", "watch", "a"),  # test, cold, unseen user/device
    ("u3", "a", "0", "4", "", "zzz b"),  # unknown behaviour id zzz
    ("u2", "c", "1", "5", "tablet", "a b c"),
    ("u1", "b", "1", "6", "mobile", "a c"),
    ("u3", "c", "0", "7", "desktop", "a b c a"),  # truncated to b c a
    ("u1", "e", "0", "10", "mobile", "c d"),  # test, cold, known category
    ("u2", "a", "1", "8", "mobile", "b"),
]
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _png(path, size, color, mode="RGB"):
  Image.new(mode, size, color).save(path)


def _jpeg_bytes(size=(64, 48), seed=0):
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, size[::-1] + (3,), dtype=np.uint8)
                  ).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


def make_dataset(root: pathlib.Path, impressions=IMPRESSIONS,
                 imp_header=IMP_HEADER, extra_items=()):
  """Six items (a-f) with images of different sizes, modes and formats."""
  (root / "img").mkdir(parents=True)
  _png(root / "img" / "a.png", (40, 20), RED)  # wide: padded top/bottom
  (root / "img" / "b.jpg").write_bytes(_jpeg_bytes((16, 30)))
  _png(root / "img" / "c.png", (10, 10), (0, 255, 0, 0), "RGBA")  # clear
  _png(root / "img" / "d.png", (5, 7), BLUE)
  _png(root / "img" / "e.png", (9, 9), 128, "L")
  _png(root / "img" / "f.png", (12, 12), BLUE)
  items = [("a", "shoes", "img/a.png"), ("b", "shoes", "img/b.jpg"),
           ("c", "hats", "img/c.png"), ("d", "bags", "img/d.png"),
           ("e", "hats", "img/e.png"), ("f", "", "img/f.png"),
           *extra_items]
  write_csv(root / "items.csv", ("item_id", "category_id", "image"), items)
  write_csv(root / "impressions.csv", imp_header, impressions)
  return root


def make_config(root, num_behaviors=3, min_count=1, hash_buckets=0,
                **byod_options):
  config = default.get_config()
  config.dataset = "byod"
  config.byod_path = str(root)
  config.data.image_size, config.data.num_behaviors = SIZE, num_behaviors
  config.data.min_count, config.data.hash_buckets = min_count, hash_buckets
  config.byod.update(byod_options)
  return config


def collect(source, split):
  chunks = list(source.impressions(split))
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def test_min_count_and_hash_buckets(tmp_path):
  """Rare train values join OOV; hashing gives unknown values own rows."""
  source = byod.make_source(make_config(make_dataset(tmp_path), min_count=2))
  # 'tablet' was seen once in train: OOV now, and counted as such.
  assert source.vocabularies["device"].ids == ("mobile", "desktop")
  assert source.vocabularies["device"].oov_count == 1
  assert source.vocab_sizes == (4, 4, 3, 3)
  train = collect(source, "train")
  np.testing.assert_array_equal(train["sparse"][4], [2, 2, 1, 0])
  hashed = byod.make_source(make_config(make_dataset(tmp_path / "h"),
                                        hash_buckets=3))
  assert hashed.vocab_sizes == (7, 7, 3, 7)  # 3 bucket rows per vocabulary
  test = collect(hashed, "test")
  # The unseen user u4, cold items d and e, device 'watch': bucket rows
  # past the kept ids, the same ones Vocabulary.row gives; still cold.
  v = hashed.vocabularies
  np.testing.assert_array_equal(test["sparse"][:, 1],
                                [v["item_id"].row("d"), v["item_id"].row("e")])
  assert (test["sparse"][:, 1] > 3).all() and test["is_cold"].all()
  assert test["sparse"][0, 0] == v["user_id"].row("u4") > 3
  assert test["sparse"][0, 3] == v["device"].row("watch") > 3


def images_by_row(source):
  out = {}
  for rows, images in source.item_images():
    assert rows.dtype == np.int64 and images.dtype == np.uint8
    out.update(zip(rows.tolist(), images))
  return out


def test_vocab_split_cold_and_behaviour(tmp_path):
  source = byod.make_source(make_config(make_dataset(tmp_path)))
  assert source.sparse_features == ("user_id", "item_id", "category_id",
                                    "device")
  # Train: users u1-u3, items a-c, categories {hats, shoes}, devices
  # {desktop, mobile, tablet}; +1 for the OOV row each.
  assert source.vocab_sizes == (4, 4, 3, 4)
  assert source.num_categories == 3 and source.num_dense == 0
  # Item rows are items.csv order; d's category 'bags' is test-only (OOV),
  # e is cold but 'hats' is a train category; f has no category.
  np.testing.assert_array_equal(source.item_category, [2, 2, 1, 0, 1, 0])
  train, test = collect(source, "train"), collect(source, "test")
  np.testing.assert_array_equal(train["impression_id"], [0, 1, 2, 4, 5, 6, 7,
                                                         9])
  np.testing.assert_array_equal(test["impression_id"], [3, 8])
  # Vocabulary rows: most train impressions first, ties by id (vocab.py):
  # users u1 u2 (3 each) u3 (2); items a c (3 each) b (2); devices mobile (4)
  # desktop (2) tablet (1); categories: the train ones, sorted.
  assert source.vocabularies["item_id"].ids == ("a", "c", "b")
  assert source.vocabularies["device"].ids == ("mobile", "desktop", "tablet")
  assert source.vocabularies["category_id"].ids == ("hats", "shoes")
  # Test rows: (u4, d, watch) all unseen -> 0; (u1, e, mobile).
  np.testing.assert_array_equal(test["sparse"], [[0, 0, 0, 0], [1, 0, 1, 1]])
  np.testing.assert_array_equal(test["item"], [3, 4])
  np.testing.assert_array_equal(test["is_cold"], [True, True])
  assert not train["is_cold"].any()
  # Train row 4: (u3, a, device '') -> empty extra value is OOV.
  np.testing.assert_array_equal(train["sparse"][3], [3, 1, 2, 0])
  np.testing.assert_array_equal(train["sparse"][1], [2, 3, 2, 2])
  np.testing.assert_array_equal(train["label"], [1, 0, 1, 0, 1, 1, 0, 1])
  # GAUC user ids: dense over all users in file order, unseen u4 included.
  np.testing.assert_array_equal(test["user_id"], [2, 0])
  np.testing.assert_array_equal(train["user_id"], [0, 1, 0, 3, 1, 0, 3, 1])
  # Behaviour: item rows, unknown dropped, last 3 kept, -1 padded.
  np.testing.assert_array_equal(train["behavior"], [
      [-1, -1, -1], [0, -1, -1], [0, -1, -1], [1, -1, -1], [0, 1, 2],
      [0, 2, -1], [1, 2, 0], [1, -1, -1]])
  np.testing.assert_array_equal(test["behavior"], [[0, -1, -1], [2, 3, -1]])
  assert train["sparse"].dtype == np.int32 and train["item"].dtype == np.int32
  assert train["label"].dtype == np.float32 and train["dense"].shape == (8, 0)
  assert source.stats["dropped_behavior_ids"] == 1
  assert source.stats["truncated_behavior_lists"] == 1
  assert source.stats["train_impressions"] == 8
  assert source.stats["test_impressions"] == 2
  assert source.stats["cold_test_impressions"] == 2
  assert source.stats["skipped_images"] == 0
  assert source.num_behaviors == 3 and source.name == "byod"


def test_images_resized_rgb_and_cache_free_path_agrees(tmp_path):
  root = make_dataset(tmp_path)
  images = images_by_row(byod.make_source(make_config(root)))
  assert sorted(images) == [0, 1, 2, 3, 4, 5]
  assert all(im.shape == (SIZE, SIZE, 3) for im in images.values())
  a = images[0].astype(int)  # 40x20 red, letterboxed on white
  np.testing.assert_array_equal(a[SIZE // 2, SIZE // 2], RED)
  np.testing.assert_array_equal(a[0, 0], (255, 255, 255))
  np.testing.assert_array_equal(images[2], 255)  # transparent -> white
  np.testing.assert_array_equal(images[4], 128)  # grey L -> RGB
  stretched = images_by_row(byod.make_source(make_config(root,
                                                         resize="stretch")))
  np.testing.assert_array_equal(stretched[0][0, 0], RED)
  uncached = images_by_row(byod.make_source(make_config(root,
                                                        image_cache_mb=0)))
  for r, im in images.items():
    np.testing.assert_array_equal(uncached[r], im)


def test_chunking_does_not_change_the_data(tmp_path):
  root = make_dataset(tmp_path)
  big = byod.make_source(make_config(root))
  small = byod.make_source(make_config(root, chunk_size=3))
  assert len(list(small.impressions("train"))) > 1
  for split in ("train", "test"):
    a, b = collect(big, split), collect(small, split)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_split_column_wins_and_no_behaviour_column(tmp_path):
  header = ("user_id", "item_id", "label", "split", "timestamp")
  rows = [("u1", "a", "1", "train", "5"), ("u2", "b", "0", "TEST", "1"),
          ("u1", "b", "1", "train", "9"), ("u3", "c", "0", "test", "2")]
  source = byod.make_source(make_config(
      make_dataset(tmp_path, rows, header), num_behaviors=2))
  test = collect(source, "test")
  np.testing.assert_array_equal(test["impression_id"], [1, 3])
  np.testing.assert_array_equal(test["is_cold"], [False, True])
  np.testing.assert_array_equal(test["behavior"], -1)
  assert source.sparse_features == ("user_id", "item_id", "category_id")


def test_hash_split_is_seeded_and_near_the_fraction(tmp_path):
  rows = [(f"u{i % 7}", "abc"[i % 3], str(i % 2)) for i in range(400)]
  root = make_dataset(tmp_path, rows, ("user_id", "item_id", "label"))
  ids = {}
  for seed in (0, 0, 1):
    source = byod.make_source(make_config(root, num_behaviors=0, seed=seed))
    test = collect(source, "test")
    assert "behavior" not in test
    ids.setdefault(seed, []).append(test["impression_id"])
    train_ids = collect(source, "train")["impression_id"]
    assert sorted(np.concatenate([train_ids, test["impression_id"]])) == list(
        range(400))
    assert 0.14 < len(test["impression_id"]) / 400 < 0.26
  np.testing.assert_array_equal(ids[0][0], ids[0][1])
  assert not np.array_equal(ids[0][0], ids[1][0])


def test_bad_images_are_skipped_and_counted(tmp_path):
  root = tmp_path
  extra = [("g", "shoes", "img/missing.png"), ("h", "shoes", "img/trunc.jpg"),
           ("i", "shoes", "img/garbage.png")]
  rows = list(IMPRESSIONS) + [
      ("u1", "g", "1", "3", "mobile", ""), ("u2", "h", "0", "4", "mobile", ""),
      ("u2", "i", "0", "4", "mobile", ""), ("u3", "a", "1", "2", "x", "g h a")]
  make_dataset(root, rows, extra_items=extra)
  (root / "img" / "trunc.jpg").write_bytes(_jpeg_bytes()[:600])
  (root / "img" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
  source = byod.make_source(make_config(root))
  s = source.stats
  assert (s["skipped_images"], s["skipped_images_missing"],
          s["skipped_images_corrupt"]) == (3, 1, 2)
  assert s["dropped_impressions"] == 3
  assert s["dropped_behavior_ids_bad_image"] == 2
  assert sorted(images_by_row(source)) == [0, 1, 2, 3, 4, 5]
  train = collect(source, "train")
  assert not np.isin(train["item"], [6, 7, 8]).any()
  assert 10 not in train["impression_id"].tolist()
  np.testing.assert_array_equal(train["behavior"][-1], [0, -1, -1])
  # Strict mode turns the skip into an error naming the items.csv line.
  with pytest.raises(byod.DataError, match=r"items.csv, line 8, field "
                     r"'image'.*missing.png"):
    byod.make_source(make_config(root, skip_bad_images=False))


def test_decode_image_classifies_errors(tmp_path):
  data = _jpeg_bytes((256, 256))
  for cut in (600, len(data) * 3 // 4):  # in the header; in the scan data
    (tmp_path / "t.jpg").write_bytes(data[:cut])
    with pytest.raises(image_io.CorruptImageError, match="(?i)truncated"):
      image_io.decode_image(str(tmp_path / "t.jpg"), SIZE)
  with pytest.raises(image_io.MissingImageError):
    image_io.decode_image(str(tmp_path / "nope.png"), SIZE)
  with pytest.raises(image_io.MissingImageError):  # a directory
    image_io.decode_image(str(tmp_path), SIZE)


@pytest.mark.parametrize("path", ["../outside.png", "img/../../outside.png",
                                  "/etc/hostname"])
def test_image_path_escape_is_an_error(tmp_path, path):
  root = tmp_path / "ds"
  _png(tmp_path / "outside.png", (4, 4), RED)
  make_dataset(root, extra_items=[("x", "hats", path)])
  with pytest.raises(byod.DataError, match=r"items.csv, line 8, field "
                     r"'image'.*escapes"):
    byod.make_source(make_config(root))


def test_absolute_path_inside_the_directory_is_fine(tmp_path):
  make_dataset(tmp_path, extra_items=[("x", "hats",
                                       str(tmp_path / "img" / "a.png"))])
  assert byod.make_source(make_config(tmp_path)).num_items == 7


@pytest.mark.parametrize("label", ["2", "-1", "yes", "", "nan"])
def test_bad_label_is_an_error(tmp_path, label):
  rows = list(IMPRESSIONS)
  rows[4] = ("u3", "a", label, "4", "", "")
  make_dataset(tmp_path, rows)
  with pytest.raises(byod.DataError, match=r"impressions.csv, line 6, field "
                     r"'label'"):
    byod.make_source(make_config(tmp_path))


def test_float_labels_are_accepted(tmp_path):
  rows = [r[:2] + ("1.0" if r[2] == "1" else "0.0",) + r[3:]
          for r in IMPRESSIONS]
  source = byod.make_source(make_config(make_dataset(tmp_path, rows)))
  assert collect(source, "train")["label"].sum() == 5


@pytest.mark.parametrize("file,drop", [("impressions.csv", "label"),
                                       ("impressions.csv", "user_id"),
                                       ("items.csv", "image"),
                                       ("items.csv", "category_id")])
def test_missing_required_column_is_an_error(tmp_path, file, drop):
  make_dataset(tmp_path)
  path = tmp_path / file
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  keep = [i for i, h in enumerate(rows[0]) if h != drop]
  write_csv(path, [rows[0][i] for i in keep],
            [[r[i] for i in keep] for r in rows[1:]])
  with pytest.raises(byod.DataError, match=rf"{file}, line 1, field '{drop}'"):
    byod.make_source(make_config(tmp_path))


@pytest.mark.parametrize("splits,empty", [(["train"] * 4, "test"),
                                          (["test"] * 4, "train")])
def test_empty_split_is_an_error(tmp_path, splits, empty):
  rows = [("u1", "abcd"[i], "1", s) for i, s in enumerate(splits)]
  make_dataset(tmp_path, rows, ("user_id", "item_id", "label", "split"))
  with pytest.raises(byod.DataError, match=rf"field 'split'.*{empty} split "
                     "is empty"):
    byod.make_source(make_config(tmp_path))


def test_all_equal_timestamps_leave_train_empty(tmp_path):
  rows = [r[:3] + ("7",) + r[4:] for r in IMPRESSIONS]
  make_dataset(tmp_path, rows)
  with pytest.raises(byod.DataError, match="field 'timestamp'.*train split"):
    byod.make_source(make_config(tmp_path))


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5])
def test_test_fraction_out_of_range_is_an_error(tmp_path, fraction):
  with pytest.raises(ValueError, match="test_fraction"):
    byod.make_source(make_config(make_dataset(tmp_path),
                                 test_fraction=fraction))


def test_unknown_item_is_an_error(tmp_path):
  rows = list(IMPRESSIONS)
  rows[6] = ("u1", "nosuch", "1", "6", "mobile", "")
  make_dataset(tmp_path, rows)
  with pytest.raises(byod.DataError, match=r"impressions.csv, line 8, field "
                     r"'item_id'.*'nosuch'"):
    byod.make_source(make_config(tmp_path))


@pytest.mark.parametrize("bad,match", [
    (("u1", "a", "1", "soon", "m", ""), r"line 3, field 'timestamp'"),
    (("u1", "a", "1"), r"line 3: expected 6 fields, found 3"),
    (("", "a", "1", "3", "m", ""), r"line 3, field 'user_id'"),
])
def test_malformed_rows_are_errors(tmp_path, bad, match):
  rows = list(IMPRESSIONS)
  rows[1] = bad
  make_dataset(tmp_path, rows)
  with pytest.raises(byod.DataError, match=match):
    byod.make_source(make_config(tmp_path))


def test_duplicate_item_is_an_error(tmp_path):
  make_dataset(tmp_path, extra_items=[("a", "hats", "img/b.jpg")])
  with pytest.raises(byod.DataError, match=r"line 8, field 'item_id'.*"
                     r"duplicate item 'a' \(first on line 2\)"):
    byod.make_source(make_config(tmp_path))


def test_iso_timestamps_split_like_numbers(tmp_path):
  rows = [r[:3] + (f"2020-01-{int(r[3]):02d}T00:00:00",) + r[4:]
          for r in IMPRESSIONS]
  source = byod.make_source(make_config(make_dataset(tmp_path, rows)))
  np.testing.assert_array_equal(collect(source, "test")["impression_id"],
                                [3, 8])


def test_impressions_changed_after_make_source_is_an_error(tmp_path):
  source = byod.make_source(make_config(make_dataset(tmp_path)))
  with open(tmp_path / "impressions.csv", "a") as f:
    f.write("u9,a,1,11,mobile,\n")
  with pytest.raises(byod.DataError, match="changed since make_source"):
    next(source.impressions("train"))


def test_prepare_dataset_reports_the_skips(tmp_path):
  """End to end through csctr.data.prepare: counted skips land in info.json."""
  from csctr.data import pipeline  # pylint: disable=g-import-not-at-top
  root = tmp_path / "ds"
  rows = list(IMPRESSIONS) + [("u1", "g", "1", "3", "mobile", ""),
                              ("u2", "h", "0", "4", "mobile", "")]
  make_dataset(root, rows, extra_items=[("g", "shoes", "img/nope.png"),
                                        ("h", "hats", "img/bad.jpg")])
  (root / "img" / "bad.jpg").write_bytes(_jpeg_bytes()[:900])
  config = make_config(root)
  config.data_dir = str(tmp_path / "prepared")
  config.data.group_size = 4
  path = pipeline.prepare_dataset(config)
  info = pipeline.load_info(path)
  stats = info.extras["source_stats"]
  assert (stats["skipped_images"], stats["dropped_impressions"]) == (2, 2)
  assert info.extras["items_without_image"] == 2
  splits = info.splits
  assert (splits["train"].impressions, splits["test"].impressions) == (8, 2)
  assert splits["test"].cold_impressions == 2
  assert info.vocab_sizes == (4, 4, 3, 4) and info.num_categories == 3
