"""Converts the McAuley Amazon review dumps into a BYOD directory.

The CSCNN paper's Amazon benchmark (inherited from DVBPR) is implicit
feedback: every review is a positive (label 1) at its review time, and each
positive gets `negatives` items the user never reviewed, sampled uniformly
(seeded), as label-0 impressions at the same time. Usage: README.md here.

Inputs:
  reviews: JSON lines (reviewerID, asin, unixReviewTime, ...), .gz or not.
  meta: one product per line (asin, imUrl, categories: list of lists); the
    2014 dumps are Python literals (single quotes), the 2018 ones strict JSON
    (category: list). Both parse; .gz or not.
  images: <asin>.jpg (or .jpeg/.png) downloaded beside them.

Output (read by csctr.data.byod): items.csv (item_id = asin, category_id = leaf
category, image = images/<asin>.jpg, linked or copied into out/images/) and
impressions.csv (user_id, item_id, label, timestamp, [split], [behavior]).
behavior lists the user's positives strictly before the impression (oldest
first, last `max_behaviors`), so DICM sees no future. split='time' leaves
splitting to the loader (latest 20% by time); 'leave_one_out' holds out one
random positive per user (with its negatives) as test, as DVBPR does.

Reviews of items without a usable image file, and repeated (user, item)
reviews, are skipped and counted. A line that parses neither as JSON nor as
a Python literal is an error naming file and line. Only the standard library
and numpy are needed; csctr itself is not imported.
"""

from __future__ import annotations

import argparse
import ast
import csv
import gzip
import json
import os
import re
import shutil
import sys
from typing import Any, Iterator

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_ASIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # Also keeps paths safe.


class ConvertError(ValueError):
  """Unreadable input; names the file and the 1-based line."""


def _open(path: str):
  with open(path, "rb") as f:
    gz = f.read(2) == b"\x1f\x8b"
  if gz:
    return gzip.open(path, "rt", encoding="utf-8")
  return open(path, encoding="utf-8")


def read_records(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields (line number, record) of a JSON-lines or Python-literal file."""
  with _open(path) as f:
    for line_no, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except ValueError:
        try:  # 2014 metadata: "{'asin': '0001', ...}"; literal_eval is safe.
          record = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
          raise ConvertError(f"{path}, line {line_no}: neither JSON nor a "
                             f"Python literal ({type(e).__name__})") from e
      if not isinstance(record, dict):
        raise ConvertError(f"{path}, line {line_no}: not a record")
      yield line_no, record


def leaf_category(record: dict[str, Any]) -> str:
  """Leaf of the first category path ('' if none): the CSCNN category."""
  paths = record.get("categories")
  if paths and isinstance(paths[0], (list, tuple)) and paths[0]:
    return str(paths[0][-1])
  flat = record.get("category")  # 2018 dumps: one path, a flat list.
  if isinstance(flat, list) and flat:
    return str(flat[-1])
  return str(record.get("main_cat", ""))


def _find_image(images_dir: str, asin: str) -> str | None:
  for ext in IMAGE_EXTENSIONS:
    path = os.path.join(images_dir, asin + ext)
    if os.path.isfile(path) and os.path.getsize(path) > 0:
      return path
  return None


def _place_image(src: str, dst: str, link: str) -> None:
  if os.path.lexists(dst):
    os.remove(dst)
  if link == "symlink":
    os.symlink(os.path.abspath(src), dst)
  elif link == "hardlink":
    os.link(src, dst)
  else:
    shutil.copyfile(src, dst)


def convert(reviews_path: str, meta_path: str, images_dir: str,
            out_dir: str, negatives_per_positive: int = 1, seed: int = 0,
            *, max_behaviors: int = 10, split: str = "time",
            link: str = "symlink") -> dict[str, int]:
  """Writes out_dir/{items.csv, impressions.csv, images/}; returns counts.

  Args:
    reviews_path: reviews JSON lines (.gz or plain).
    meta_path: metadata, JSON or Python-literal lines (.gz or plain).
    images_dir: holds <asin>.jpg (.jpeg, .png); empty files count as missing.
    out_dir: the BYOD directory to write (created).
    negatives_per_positive: sampled unreviewed items per review.
    seed: seeds negative sampling and the leave_one_out choice.
    max_behaviors: length of the behavior column (0: no column).
    split: 'time' (no split column) or 'leave_one_out'.
    link: how images get into out_dir/images: symlink | hardlink | copy.

  Returns:
    Counters: reviews, positives, negatives, items, users and every skip.
  """
  if split not in ("time", "leave_one_out"):
    raise ValueError(f"split {split!r} not in ('time', 'leave_one_out')")
  if link not in ("symlink", "hardlink", "copy"):
    raise ValueError(f"link {link!r} not in ('symlink', 'hardlink', 'copy')")
  stats = dict.fromkeys(
      ("meta_records", "reviews", "duplicate_reviews", "reviews_without_image",
       "items_without_image", "items_without_meta", "bad_asins", "items",
       "users", "positives", "negatives", "negatives_short"), 0)
  category = {}
  for _, record in read_records(meta_path):
    stats["meta_records"] += 1
    if "asin" in record:
      category[str(record["asin"])] = leaf_category(record)
  images, users = _read_reviews(reviews_path, images_dir, stats)
  items = sorted({a for seen in users.values() for a in seen})
  _write_items(out_dir, items, images, category, link, stats)
  stats["items"], stats["users"] = len(items), len(users)
  _write_impressions(out_dir, users, items, negatives_per_positive, seed,
                     max_behaviors, split, stats)
  return stats


def _read_reviews(reviews_path: str, images_dir: str, stats: dict[str, int]
                  ) -> tuple[dict[str, str | None], dict[str, dict[str, int]]]:
  """(asin -> image path or None, user -> {asin: first review time}).

  Users are held whole: negative sampling needs every user's full set of
  reviewed items anyway (an item reviewed later is no negative).
  """
  images, users = {}, {}
  for line_no, record in read_records(reviews_path):
    try:
      user, asin = str(record["reviewerID"]), str(record["asin"])
      time = int(record["unixReviewTime"])
    except (KeyError, TypeError, ValueError) as e:
      raise ConvertError(f"{reviews_path}, line {line_no}: needs reviewerID, "
                         f"asin and an integer unixReviewTime ({e!r})") from e
    stats["reviews"] += 1
    if asin not in images:
      ok = _ASIN.fullmatch(asin) is not None
      stats["bad_asins"] += not ok
      images[asin] = _find_image(images_dir, asin) if ok else None
      stats["items_without_image"] += ok and images[asin] is None
    if images[asin] is None:
      stats["reviews_without_image"] += 1
      continue
    seen = users.setdefault(user, {})
    if asin in seen:
      stats["duplicate_reviews"] += 1
      time = min(time, seen[asin])
    seen[asin] = time
  return images, users


def _write_items(out_dir: str, items: list[str], images: dict[str, Any],
                 category: dict[str, str], link: str,
                 stats: dict[str, int]) -> None:
  """items.csv, and every item's image placed under out_dir/images."""
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  with open(os.path.join(out_dir, "items.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(("item_id", "category_id", "image"))
    for asin in items:
      src = images[asin]
      rel = "images/" + asin + os.path.splitext(src)[1].lower()
      _place_image(src, os.path.join(out_dir, rel), link)
      stats["items_without_meta"] += asin not in category
      writer.writerow((asin, category.get(asin, ""), rel))


def _write_impressions(out_dir: str, users: dict[str, dict[str, int]],
                       items: list[str], negatives_per_positive: int,
                       seed: int, max_behaviors: int, split: str,
                       stats: dict[str, int]) -> None:
  """impressions.csv: every review a positive, plus sampled negatives."""
  rng = np.random.default_rng(seed)
  header = ["user_id", "item_id", "label", "timestamp"]
  header += ["split"] * (split == "leave_one_out")
  header += ["behavior"] * (max_behaviors > 0)
  with open(os.path.join(out_dir, "impressions.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for user, seen in users.items():
      history = sorted((t, a) for a, t in seen.items())
      held_out = (int(rng.integers(len(history)))
                  if split == "leave_one_out" and len(history) > 1 else -1)
      for i, (time, asin) in enumerate(history):
        extra = [("test" if i == held_out else "train")] * (
            split == "leave_one_out")
        if max_behaviors:
          # Strictly earlier, and never the held-out test item (a leak).
          before = [a for j, (t, a) in enumerate(history[:i])
                    if t < time and j != held_out]
          extra.append(" ".join(before[-max_behaviors:]))
        writer.writerow([user, asin, 1, time, *extra])
        stats["positives"] += 1
        for neg in _negatives(rng, items, seen, negatives_per_positive):
          writer.writerow([user, neg, 0, time, *extra])
          stats["negatives"] += 1
        stats["negatives_short"] += negatives_per_positive - min(
            negatives_per_positive, len(items) - len(seen))


def _negatives(rng: np.random.Generator, items: list[str],
               seen: dict[str, int], k: int) -> list[str]:
  """k distinct items the user never reviewed (fewer if there are fewer)."""
  k = min(k, len(items) - len(seen))
  picked = []
  while len(picked) < k:  # Rejection: users review a tiny share of items.
    asin = items[int(rng.integers(len(items)))]
    if asin not in seen and asin not in picked:
      picked.append(asin)
  return picked


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reviews", required=True, help="reviews .json[.gz]")
  parser.add_argument("--meta", required=True, help="metadata .json[.gz]")
  parser.add_argument("--images", required=True, help="dir of <asin>.jpg")
  parser.add_argument("--out", required=True, help="BYOD directory to write")
  parser.add_argument("--negatives", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max_behaviors", type=int, default=10)
  parser.add_argument("--split", default="time",
                      choices=("time", "leave_one_out"))
  parser.add_argument("--link", default="symlink",
                      choices=("symlink", "hardlink", "copy"))
  args = parser.parse_args(argv)
  stats = convert(args.reviews, args.meta, args.images, args.out,
                  args.negatives, args.seed, max_behaviors=args.max_behaviors,
                  split=args.split, link=args.link)
  json.dump(stats, sys.stdout, indent=1)
  print()


if __name__ == "__main__":
  main()
