"""The embedded synthetic benchmark: procedural product images, known true CTR.

Why it looks the way it does. A visual CTR model is only worth its CNN if
(a) click propensity depends on what the image shows, so items whose ID
embedding never trained (cold items) are still predictable, and (b) the same
image feature means different things in different categories, so a
category-conditioned encoder (CSCNN's channel and spatial priors) has a reason
to exist. Every image therefore carries *all* candidate cues and only the
category decides which one counts:

* the product (a centred shape) has a random RGB colour; in "colour"
  categories (odd ids) one channel of that colour is the cue, with a
  category-specific channel and sign (category 7 reads red the opposite way to
  category 1);
* each image has a striped patch in every corner, of random contrast (the
  patches are mid-grey on average, so the cue is texture, not brightness); in
  "pattern" categories (even ids) the contrast of one category-specific corner
  is the cue, the other three are distractors.

That cue becomes the item's visual score s in [-1, 1]. The shape (circle,
square, diamond, cross) is a second visual attribute that users have a taste
for, which gives behaviour images (DICM) something to reveal. The true CTR is

    sigmoid(b0 + user_bias + affinity[user, category] + w_vis * s
            + item_effect + taste[user, shape] - slope * position)

and labels are Bernoulli draws from it, so the Bayes-optimal AUC of the test
split is known (prepare records it). The split is by time: the last
`test_fraction` of impressions is the test split, and `cold_item_fraction` of
the items are introduced only then. Items never drawn in training (those, and
the odd unpopular warm item) are cold: is_cold is set and they map to the OOV
row 0 of `item_id`, as a vocabulary built on the training split would map
them.

`ImpressionSimulator` is the part shared with `csctr.data.fashion_mnist`: given
per-item latents it streams impressions chunk by chunk (each chunk seeded by
(seed, chunk index), so the stream is deterministic and never all in memory).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import ml_collections
import numpy as np

from csctr.data import source as source_lib
from csctr.data import vocab as vocab_lib

SPARSE_FEATURES = ("user_id", "item_id", "category_id", "position")
NUM_SHAPES = 4
# Streams of the seed sequence, so adding a stream never shifts another.
_ITEMS, _USERS, _IMAGES, _CHUNKS, _RENDER = 1, 2, 3, 4, 5


@dataclasses.dataclass(frozen=True)
class ClickModel:
  """Coefficients of the true click model (logit scale)."""
  base_logit: float = -2.0
  visual_weight: float = 1.5  # * s in [-1, 1]: the image matters a lot
  item_effect_std: float = 0.35  # only learnable through item_id
  user_bias_std: float = 0.3
  affinity_std: float = 0.6  # user x category
  taste_std: float = 0.5  # user x shape (what behaviour images reveal)
  position_slope: float = 0.12
  num_positions: int = 10
  popularity_exponent: float = 0.8  # Zipf exponent of item exposure
  user_activity_exponent: float = 0.3


@dataclasses.dataclass
class ItemLatents:
  """Per-item ground truth the simulator needs (all arrays have length N).

  Attributes:
    category: int32 category row, 1..C (0 is OOV and never used).
    visual_score: float32 in [-1, 1], the click-relevant meaning of the image.
    style: int32 in [0, num_styles), a visual attribute users have tastes for.
    is_cold: bool, the item is introduced only in the test period (the
      simulator's `is_cold` adds warm items that happen never to be drawn in
      training).
  """
  category: np.ndarray
  visual_score: np.ndarray
  style: np.ndarray
  is_cold: np.ndarray
  num_styles: int = NUM_SHAPES


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x))


class ImpressionSimulator:
  """Streams impressions of simulated users over items with known latents."""

  def __init__(self, items: ItemLatents, *, num_categories: int,
               num_users: int, num_impressions: int, test_fraction: float,
               num_behaviors: int, chunk_size: int, seed: int,
               min_count: int = 1, hash_buckets: int = 0,
               model: ClickModel = ClickModel()):
    self.items, self.model = items, model
    self.num_categories, self.num_users = num_categories, num_users
    self.num_behaviors, self.chunk_size, self.seed = (
        num_behaviors, chunk_size, seed)
    self.num_test = int(round(num_impressions * test_fraction))
    self.num_train = num_impressions - self.num_test
    n = len(items.category)
    rng = np.random.default_rng([seed, _ITEMS])
    self.item_effect = rng.normal(0, model.item_effect_std,
                                  n).astype(np.float32)
    rank = rng.permutation(n)
    popularity = (rank + 1.0) ** -model.popularity_exponent
    self._cdf = {
        "train": np.cumsum(np.where(items.is_cold, 0.0, popularity)),
        "test": np.cumsum(popularity),
    }
    for cdf in self._cdf.values():
      cdf /= cdf[-1]
    rng = np.random.default_rng([seed, _USERS])
    self.user_bias = rng.normal(0, model.user_bias_std, num_users)
    self.affinity = rng.normal(0, model.affinity_std,
                               (num_users, num_categories))
    self.taste = rng.normal(0, model.taste_std, (num_users, items.num_styles))
    activity = rng.permutation(num_users) + 1.0
    self._user_cdf = np.cumsum(activity ** -model.user_activity_exponent)
    self._user_cdf /= self._user_cdf[-1]
    self._buffer_after_train = None
    # Vocabularies built on the training split, as real ones would be
    # (csctr/data/vocab.py): users and items drawn at least min_count times
    # in training get rows 1..; the others share the OOV row 0 (or, with
    # hash_buckets, hash into extra rows). Items never drawn in training (the
    # items introduced later, and the rare warm item never drawn) are cold.
    # One cheap pass over the training draws counts them.
    item_counts = np.zeros(n, np.int64)
    user_counts = np.zeros(num_users, np.int64)
    for index, start, end in self._ranges("train"):
      _, users, drawn = self._draw(index, start, end, "train")
      item_counts += np.bincount(drawn, minlength=n)
      user_counts += np.bincount(users, minlength=num_users)
    self.is_cold = item_counts == 0
    self.vocabularies = {
        name: vocab_lib.Vocabulary.build(
            name, {i: c for i, c in enumerate(counts) if c},
            min_count=min_count, hash_buckets=hash_buckets)
        for name, counts in (("user_id", user_counts),
                             ("item_id", item_counts))}
    # Raw user/item index -> table row.
    self.user_vocab = self.vocabularies["user_id"].lookup(range(num_users))
    self.item_vocab = self.vocabularies["item_id"].lookup(range(n))

  @property
  def vocab_sizes(self) -> tuple[int, ...]:
    return (self.vocabularies["user_id"].size,
            self.vocabularies["item_id"].size, self.num_categories,
            self.model.num_positions + 1)

  def _ranges(self, split: str) -> list[tuple[int, int, int]]:
    """(chunk index, first impression, end) of the split's chunks."""
    lo, hi = (0, self.num_train) if split == "train" else (
        self.num_train, self.num_train + self.num_test)
    first_chunk = (0 if split == "train"
                   else -(-self.num_train // self.chunk_size))
    return [(first_chunk + i, s, min(s + self.chunk_size, hi))
            for i, s in enumerate(range(lo, hi, self.chunk_size))]

  def chunks(self, split: str) -> Iterator[source_lib.ImpressionChunk]:
    """Impression chunks of `split` ('train' | 'test') in time order."""
    if split not in ("train", "test"):
      raise ValueError(f"unknown split {split!r}")
    buffer = np.full((self.num_users, self.num_behaviors), -1, np.int32)
    if split == "test":
      if self._buffer_after_train is None:
        # Behaviour lists carry over from training time: replay it (cheap).
        for _ in self.chunks("train"):
          pass
      buffer = self._buffer_after_train.copy()
    for index, start, end in self._ranges(split):
      yield self._chunk(split, index, start, end, buffer)
    if split == "train":
      self._buffer_after_train = buffer.copy()

  def _draw(self, index, start, end, split):
    """(rng, users, items) of chunk `index`; the rng continues from there."""
    rng = np.random.default_rng([self.seed, _CHUNKS, index])
    users = np.searchsorted(self._user_cdf,
                            rng.random(end - start)).astype(np.int32)
    return rng, users, self._draw_items(rng, split, start, end)

  def _draw_items(self, rng, split, start, end):
    """Items of impressions start..end: popularity draws (a subclass may
    schedule them instead, csctr/data/sparse_log.py)."""
    # Every draw is independent of time within a split.
    return np.searchsorted(self._cdf[split],
                           rng.random(end - start)).astype(np.int32)

  def _chunk(self, split, index, start, end, buffer):
    m, it = self.model, self.items
    n = end - start
    rng, users, items = self._draw(index, start, end, split)
    position = rng.integers(0, m.num_positions, n).astype(np.int32)
    cat = it.category[items]
    logit = (m.base_logit + self.user_bias[users] + self.affinity[users, cat]
             + m.visual_weight * it.visual_score[items]
             + self.item_effect[items] + self.taste[users, it.style[items]]
             - m.position_slope * position)
    true_ctr = _sigmoid(logit).astype(np.float32)
    label = (rng.random(n) < true_ctr).astype(np.float32)
    chunk = {
        "item": items,
        "sparse": np.stack([self.user_vocab[users], self.item_vocab[items],
                            cat, position + 1], axis=1).astype(np.int32),
        "dense": np.zeros((n, 0), np.float32),
        "label": label,
        "user_id": users,
        "is_cold": self.is_cold[items],
        "impression_id": np.arange(start, end, dtype=np.int32),
        "true_ctr": true_ctr,
    }
    if self.num_behaviors:
      chunk["behavior"] = behavior_lists(users, items, label > 0, buffer)
    return chunk


def behavior_lists(users: np.ndarray, items: np.ndarray, clicked: np.ndarray,
                   buffer: np.ndarray) -> np.ndarray:
  """Last L items each user clicked before each impression (vectorised).

  Args:
    users: int [n] user of each impression, in time order.
    items: int [n] item row of each impression.
    clicked: bool [n].
    buffer: int32 [num_users, L], each user's last L clicks before this chunk
      (most recent last, -1 = none); updated in place.

  Returns:
    int32 [n, L], most recent last, -1 where the user has fewer clicks.
  """
  n, num_behaviors = len(users), buffer.shape[1]
  order = np.argsort(users, kind="stable")
  clicked_sorted = clicked[order].astype(np.int64)
  uniq, first, counts = np.unique(users[order], return_index=True,
                                  return_counts=True)
  seg = np.repeat(np.arange(len(uniq)), counts)
  before = np.cumsum(clicked_sorted) - clicked_sorted
  prior = before - before[first][seg]  # this user's clicks earlier in chunk
  seg_len = num_behaviors + np.add.reduceat(clicked_sorted, first)
  seg_off = np.cumsum(seg_len) - seg_len
  # Per user: [buffer (L), clicked items in time order].
  lst = np.empty(int(seg_len.sum()), np.int32)
  window = np.arange(num_behaviors)
  lst[seg_off[:, None] + window] = buffer[uniq]
  hit = np.flatnonzero(clicked_sorted)
  lst[seg_off[seg[hit]] + num_behaviors + prior[hit]] = items[order][hit]
  out = np.empty((n, num_behaviors), np.int32)
  out[order] = lst[(seg_off[seg] + prior)[:, None] + window]
  buffer[uniq] = lst[(seg_off + seg_len - num_behaviors)[:, None] + window]
  return out


def category_cues(num_categories: int) -> dict[int, dict[str, object]]:
  """Which visual cue drives clicks in each category (1..C-1), and its sign.

  Odd categories read one colour channel of the product, even ones the stripe
  contrast of one corner. Channels and corners cycle, and signs flip, so that
  the same feature means different things in different categories.
  """
  cues = {}
  for c in range(1, num_categories):
    j = (c - 1) // 2
    if c % 2:
      cues[c] = {"kind": "colour", "channel": j % 3,
                 "sign": 1 if (j // 3) % 2 == 0 else -1}
    else:
      cues[c] = {"kind": "pattern", "corner": j % 4,
                 "sign": 1 if j % 2 == 0 else -1}
  return cues


@dataclasses.dataclass
class ImageLatents:
  """What the renderer draws for each item."""
  colour: np.ndarray  # [N, 3] product RGB in [0.2, 0.9]
  contrast: np.ndarray  # [N, 4] stripe contrast per corner in [0, 1]
  shape: np.ndarray  # [N] in [0, NUM_SHAPES)
  background: np.ndarray  # [N, 3]
  offset: np.ndarray  # [N, 2] centre jitter, fraction of the image size
  radius: np.ndarray  # [N] fraction of the image size


def sample_items(num_items: int, num_categories: int, cold_fraction: float,
                 seed: int) -> tuple[ItemLatents, ImageLatents]:
  """Draws the items' categories, image latents and the resulting scores."""
  rng = np.random.default_rng([seed, _IMAGES])
  n = num_items
  img = ImageLatents(
      colour=rng.uniform(0.2, 0.9, (n, 3)).astype(np.float32),
      contrast=rng.uniform(0.0, 1.0, (n, 4)).astype(np.float32),
      shape=rng.integers(0, NUM_SHAPES, n).astype(np.int32),
      background=rng.uniform(0.05, 0.3, (n, 3)).astype(np.float32),
      offset=rng.uniform(-0.05, 0.05, (n, 2)).astype(np.float32),
      radius=rng.uniform(0.18, 0.24, n).astype(np.float32))
  category = rng.integers(1, num_categories, n).astype(np.int32)
  score = np.zeros(n, np.float32)
  for c, cue in category_cues(num_categories).items():
    sel = category == c
    if cue["kind"] == "colour":
      raw = (img.colour[sel, cue["channel"]] - 0.55) / 0.35
    else:
      raw = 2.0 * img.contrast[sel, cue["corner"]] - 1.0
    score[sel] = cue["sign"] * raw
  is_cold = np.zeros(n, bool)
  is_cold[rng.permutation(n)[:int(round(n * cold_fraction))]] = True
  items = ItemLatents(category=category, visual_score=score, style=img.shape,
                      is_cold=is_cold)
  return items, img


def shape_masks(img: ImageLatents, rows: np.ndarray,
                size: int) -> np.ndarray:
  """bool [m, size, size]: where each item's product shape lies."""
  s = size
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
  cx = (0.5 + img.offset[rows, 0])[:, None, None] * s
  cy = (0.5 + img.offset[rows, 1])[:, None, None] * s
  r = img.radius[rows][:, None, None] * s
  dx, dy = np.abs(xx[None] - cx), np.abs(yy[None] - cy)
  masks = np.stack([dx**2 + dy**2 < r**2,  # circle
                    np.maximum(dx, dy) < 0.85 * r,  # square
                    dx + dy < 1.2 * r,  # diamond
                    (np.minimum(dx, dy) < 0.4 * r) & (np.maximum(dx, dy) < r)])
  return np.take_along_axis(masks, img.shape[rows][None, :, None, None], 0)[0]


def render(img: ImageLatents, rows: np.ndarray, size: int,
           rng: np.random.Generator) -> np.ndarray:
  """Draws items `rows` as uint8 [m, size, size, 3] (vectorised)."""
  s, m = size, len(rows)
  out = img.background[rows][:, None, None, :] + rng.normal(
      0, 0.03, (m, s, s, 1)).astype(np.float32)
  mask = shape_masks(img, rows, size)
  out = np.where(mask[..., None], img.colour[rows][:, None, None, :], out)
  p, margin, half = max(2, s // 4), max(1, round(0.03 * s)), max(1, s // 16)
  stripes = ((np.arange(p) // half) % 2) * 2.0 - 1.0  # vertical, +-1
  for q in range(4):
    y0 = margin if q < 2 else s - margin - p
    x0 = margin if q % 2 == 0 else s - margin - p
    patch = 0.5 + 0.45 * img.contrast[rows, q][:, None, None] * stripes
    out[:, y0:y0 + p, x0:x0 + p, :] = np.broadcast_to(
        patch, (m, p, p))[..., None]
  return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def simulator_for(items: ItemLatents, num_categories: int,
                  section: ml_collections.ConfigDict,
                  data: ml_collections.ConfigDict) -> ImpressionSimulator:
  """The simulator of a generated dataset: its config section's sizes and
  seed (config.synthetic, config.fashion_mnist) and config.data's L and
  vocabulary rules."""
  return ImpressionSimulator(
      items, num_categories=num_categories, num_users=section.num_users,
      num_impressions=section.num_impressions,
      test_fraction=section.test_fraction, num_behaviors=data.num_behaviors,
      chunk_size=section.chunk_size, seed=section.seed,
      min_count=data.min_count, hash_buckets=data.hash_buckets)


def make_source(config: ml_collections.ConfigDict) -> source_lib.Source:
  """The synthetic dataset of `config.synthetic` as a streaming Source."""
  cfg, size = config.synthetic, config.data.image_size
  if not 8 <= size <= 128:
    raise ValueError(
        f"synthetic images need 8 <= image_size <= 128, got {size}")
  if not (0 <= cfg.cold_item_fraction < 1 and 0 <= cfg.test_fraction < 1):
    raise ValueError("synthetic: cold_item_fraction and test_fraction must be "
                     "in [0, 1)")
  num_categories = cfg.num_categories + 1  # row 0 = OOV
  items, img = sample_items(cfg.num_items, num_categories,
                            cfg.cold_item_fraction, cfg.seed)
  sim = simulator_for(items, num_categories, cfg, config.data)

  def item_images(batch: int = 256):
    for i, lo in enumerate(range(0, cfg.num_items, batch)):
      rows = np.arange(lo, min(lo + batch, cfg.num_items))
      yield rows, render(img, rows, size,
                         np.random.default_rng([cfg.seed, _RENDER, i]))

  return source_lib.Source(
      name="synthetic", image_size=size, item_category=items.category,
      num_categories=num_categories, sparse_features=SPARSE_FEATURES,
      vocab_sizes=sim.vocab_sizes, num_dense=0,
      num_behaviors=config.data.num_behaviors, item_images=item_images,
      impressions=sim.chunks, vocabularies=sim.vocabularies,
      stats={"num_items": cfg.num_items,
             "num_cold_items": int(sim.is_cold.sum()),
             "num_users": cfg.num_users})
