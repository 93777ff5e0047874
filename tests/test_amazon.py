"""Tests for data/amazon/convert.py on a tiny fixture in the dumps' format."""

import csv
import gzip
import importlib.util
import json
import os
import pathlib

import numpy as np
from PIL import Image
import pytest

from configs import amazon as amazon_config
from csctr.data import byod

_PATH = pathlib.Path(__file__).parents[1] / "data" / "amazon" / "convert.py"
_spec = importlib.util.spec_from_file_location("amazon_convert", _PATH)
convert_lib = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_lib)

# (reviewerID, asin, unixReviewTime). P6 has no image, P7 an empty (failed)
# download; U1 reviews P1 twice.
REVIEWS = [
    ("U1", "P1", 100), ("U2", "P1", 110), ("U1", "P2", 120),
    ("U3", "P3", 130), ("U2", "P4", 140), ("U1", "P6", 150),
    ("U3", "P1", 160), ("U4", "P5", 170), ("U1", "P1", 180),
    ("U4", "P2", 190), ("U2", "P7", 200), ("U3", "P5", 210),
]
META = [  # 2014 dumps: Python literals; 2018: JSON with a flat 'category'.
    "{'asin': 'P1', 'imUrl': 'http://x/P1.jpg', 'categories': "
    "[['Clothing', 'Women', 'Dresses'], ['Sale']], 'title': \"Ann's dress\"}",
    json.dumps({"asin": "P2", "categories": [["Clothing", "Men", "Shirts"]]}),
    json.dumps({"asin": "P3", "category": ["Shoes", "Boots"]}),
    "{'asin': 'P4', 'categories': [['Clothing', 'Women', 'Dresses']]}",
    json.dumps({"asin": "P6", "categories": [["Shoes", "Sandals"]]}),
]  # P5 has no metadata.


def write_lines(path: pathlib.Path, lines, gz: bool):
  text = "".join(line + "\n" for line in lines)
  if gz:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text)


def make_dumps(root: pathlib.Path, gz: bool = True):
  images = root / "downloaded"
  images.mkdir(parents=True)
  for i, asin in enumerate(["P1", "P2", "P3", "P4", "P5"]):
    Image.new("RGB", (20 + 7 * i, 30), (40 * i, 100, 200)).save(
        images / f"{asin}.jpg")
  (images / "P7.jpg").write_bytes(b"")
  suffix = ".json.gz" if gz else ".json"
  reviews = root / f"reviews{suffix}"
  write_lines(reviews, [json.dumps({"reviewerID": u, "asin": a,
                                    "unixReviewTime": t, "overall": 5.0})
                        for u, a, t in REVIEWS], gz)
  meta = root / f"meta{suffix}"
  write_lines(meta, META, gz)
  return str(reviews), str(meta), str(images)


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


@pytest.mark.parametrize("gz", [True, False])
def test_convert_writes_byod_with_seeded_negatives(tmp_path, gz):
  reviews, meta, images = make_dumps(tmp_path / "dumps", gz)
  out = tmp_path / "out"
  stats = convert_lib.convert(reviews, meta, images, str(out),
                              negatives_per_positive=2, seed=0)
  assert stats["reviews"] == 12 and stats["meta_records"] == 5
  assert stats["reviews_without_image"] == 2  # P6, P7
  assert stats["items_without_image"] == 2
  assert stats["duplicate_reviews"] == 1
  assert stats["items_without_meta"] == 1  # P5
  assert (stats["items"], stats["users"], stats["positives"]) == (5, 4, 9)
  items = {r["item_id"]: r for r in read_csv(out / "items.csv")}
  assert sorted(items) == ["P1", "P2", "P3", "P4", "P5"]
  assert items["P1"]["category_id"] == "Dresses"  # categories[0][-1]
  assert items["P3"]["category_id"] == "Boots"  # 2018 flat 'category'
  assert items["P5"]["category_id"] == ""
  for r in items.values():
    path = out / r["image"]
    assert path.is_symlink() and Image.open(path).size[1] == 30

  rows = read_csv(out / "impressions.csv")
  positives = [r for r in rows if r["label"] == "1"]
  negatives = [r for r in rows if r["label"] == "0"]
  assert len(positives) == 9 and len(negatives) == stats["negatives"] == 18
  reviewed = {}
  for u, a, _ in REVIEWS:
    reviewed.setdefault(u, set()).add(a)
  for i, r in enumerate(rows):
    if r["label"] == "1":
      pos = r
    else:  # Negatives follow their positive: same user and time.
      assert (r["user_id"], r["timestamp"]) == (pos["user_id"],
                                                pos["timestamp"])
      assert r["item_id"] not in reviewed[r["user_id"]]
      assert r["item_id"] in items
  # U1: the repeated P1 review keeps the earliest time; P6 has no image.
  u1 = [(r["item_id"], r["timestamp"], r["behavior"]) for r in positives
        if r["user_id"] == "U1"]
  assert u1 == [("P1", "100", ""), ("P2", "120", "P1")]
  # Seeded: the same seed gives the same file, another seed other negatives.
  again = tmp_path / "again"
  convert_lib.convert(reviews, meta, images, str(again), 2, seed=0)
  assert (again / "impressions.csv").read_text() == (
      out / "impressions.csv").read_text()
  other = tmp_path / "other"
  convert_lib.convert(reviews, meta, images, str(other), 2, seed=1)
  assert (other / "impressions.csv").read_text() != (
      out / "impressions.csv").read_text()


def test_converted_directory_loads_through_make_source(tmp_path):
  reviews, meta, images = make_dumps(tmp_path / "dumps")
  out = tmp_path / "out"
  convert_lib.main([f"--reviews={reviews}", f"--meta={meta}",
                    f"--images={images}", f"--out={out}", "--negatives=1",
                    "--seed=0", "--link=copy"])
  config = amazon_config.get_config()
  config.byod_path = str(out)
  config.data.image_size, config.data.num_behaviors = 8, 2
  source = byod.make_source(config)
  assert source.name == "amazon" and source.num_items == 5
  assert source.stats["skipped_images"] == 0
  n = sum(len(c["label"]) for s in ("train", "test")
          for c in source.impressions(s))
  assert n == 18 == source.stats["train_impressions"] + source.stats[
      "test_impressions"]
  test = next(source.impressions("test"))
  assert test["behavior"].shape[1] == 2 and (test["behavior"] >= 0).any()
  assert sum(len(r) for r, _ in source.item_images()) == 5
  assert not os.path.islink(out / "images" / "P1.jpg")


def test_leave_one_out_holds_one_review_per_user(tmp_path):
  reviews, meta, images = make_dumps(tmp_path / "dumps")
  out = tmp_path / "out"
  convert_lib.convert(reviews, meta, images, str(out), 1, seed=3,
                      split="leave_one_out", max_behaviors=0)
  rows = read_csv(out / "impressions.csv")
  assert "behavior" not in rows[0]
  test_pos = [r["user_id"] for r in rows
              if r["label"] == "1" and r["split"] == "test"]
  # U1, U2, U3 have two usable reviews, U4 two as well: one each.
  assert sorted(test_pos) == ["U1", "U2", "U3", "U4"]
  assert sum(r["split"] == "test" for r in rows) == 8


def test_unparseable_meta_line_names_file_and_line(tmp_path):
  reviews, meta, images = make_dumps(tmp_path / "dumps", gz=False)
  with open(meta, "a") as f:
    f.write("{'asin': 'P9', broken\n")
  with pytest.raises(convert_lib.ConvertError, match=r"meta.json, line 6"):
    convert_lib.convert(reviews, meta, images, str(tmp_path / "out"))


def test_negative_sampling_never_picks_reviewed_items():
  rng = np.random.default_rng(0)
  items = [f"I{i}" for i in range(6)]
  seen = {"I0": 1, "I2": 1, "I3": 1, "I5": 1}
  for _ in range(50):
    picked = convert_lib._negatives(rng, items, seen, 3)
    assert sorted(picked) == ["I1", "I4"]  # Only two left: fewer, distinct.
