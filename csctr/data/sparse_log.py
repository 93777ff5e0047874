"""A realistic sparse log: long-tail items, ~100 categories, photo-like images.

Why it exists. The embedded synthetic benchmark (csctr/data/synthetic.py) is
dense: 4 000 items shown ~50 times each, 8 categories, flat cartoon images.
Real catalogues are not: most items are shown a handful of times, there are
many product types, and photos carry texture, lighting and clutter that have
nothing to do with clicks. On such a log the item ID barely trains, so an
image model either reads the click cue from pixels or loses to a category
prior. This dataset ('sparse', config.sparse) is that case with a known
answer:

* every item has 1-5 impressions in the whole log, P(n) proportional to
  n^-tail_exponent (most items are shown once or twice);
* ~100 categories; the click cue is still category-dependent, drawn by
  synthetic.sample_items: in odd categories one colour channel of the product
  (channel and sign set by the category), in even ones the strength of one of
  four texture orientations (0/45/90/135 degrees) woven into the product's
  surface, the other three are distractors;
* images are rendered "photo-like" (`render_photos`): a textured background
  of random low-frequency patterns, the product (one of four silhouettes)
  with a woven surface texture, a directional light, sensor noise. The light
  scales the product's colour, so the colour cue is seen through shading;
* sampled negatives: the log keeps every click and a fraction
  `negative_keep_rate` of the non-clicks, as implicit-feedback logs with
  sampled negatives do. Keeping non-clicks at rate r multiplies the odds of
  a logged row being a click by 1/r, so a logged row's true click
  probability is sigmoid(logit - log r) exactly; the generator draws the
  logged rows from that directly (one row per kept impression);
* users, their category affinities and shape tastes, positions and labels
  come from synthetic.ImpressionSimulator (its _draw_items hook is replaced
  by a fixed schedule that realises the 1-5 counts). `cold_item_fraction` of
  the items appear only in the test period; warm items whose impressions all
  fall there are cold too (never seen in training).

true_ctr is the logged row's click probability, so prepare records the Bayes
AUC of every split (SplitStats.bayes_auc, bayes_auc_cold).
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from csctr.data import source as source_lib
from csctr.data import synthetic

MAX_IMPRESSIONS = 5
# Seed streams (beside synthetic's 1..5, which the simulator uses).
_COUNTS, _SCHEDULE, _PHOTO, _RENDER = 11, 12, 13, 14
# Texture orientations woven into the product surface, one per "corner" cue.
_ORIENTATIONS = np.deg2rad([0.0, 45.0, 90.0, 135.0])


def impression_counts(num_items: int, tail_exponent: float,
                      rng: np.random.Generator) -> np.ndarray:
  """Impressions per item in 1..5 with P(n) ~ n^-tail_exponent."""
  n = np.arange(1, MAX_IMPRESSIONS + 1)
  p = n ** -float(tail_exponent)
  return rng.choice(n, size=num_items, p=p / p.sum()).astype(np.int64)


def schedule(counts: np.ndarray, introduced_late: np.ndarray,
             test_fraction: float, rng: np.random.Generator) -> np.ndarray:
  """Item of every impression in time order (int32 [sum(counts)]).

  Items introduced late (cold by design) are shown only in the last
  `test_fraction` of the log; the other items' impressions are spread at
  random over the whole log.
  """
  items = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
  late = introduced_late[items]
  total = len(items)
  num_test = int(round(total * test_fraction))
  if late.sum() > num_test:
    raise ValueError(
        f"sparse: cold items need {int(late.sum())} impressions but the test "
        f"period has {num_test}; lower cold_item_fraction or raise "
        "test_fraction")
  out = np.empty(total, np.int32)
  test_slots = total - num_test + rng.permutation(num_test)
  late_slots = test_slots[:late.sum()]
  out[late_slots] = rng.permutation(items[late])
  free = np.ones(total, bool)
  free[late_slots] = False
  out[free] = rng.permutation(items[~late])
  return out


class ScheduledSimulator(synthetic.ImpressionSimulator):
  """ImpressionSimulator whose items follow a fixed schedule (not draws)."""

  def __init__(self, items: synthetic.ItemLatents, order: np.ndarray,
               **kwargs):
    self._order = order  # read by _draw_items during the base's count pass
    super().__init__(items, num_impressions=len(order), **kwargs)

  def _draw_items(self, rng, split, start, end):
    del rng, split  # the schedule fixes who is shown when
    return self._order[start:end]


@dataclasses.dataclass
class PhotoLatents:
  """Nuisance detail of the photos (no bearing on clicks)."""
  phase: np.ndarray  # [N, 4] texture phases
  light: np.ndarray  # [N, 2] light direction (unit vector)
  bg_freq: np.ndarray  # [N, 2, 2] two background waves, cycles per image
  bg_phase: np.ndarray  # [N, 2]
  bg_tint: np.ndarray  # [N, 3] second background colour


def photo_latents(num_items: int, seed: int) -> PhotoLatents:
  rng = np.random.default_rng([seed, _PHOTO])
  angle = rng.uniform(0, 2 * np.pi, num_items)
  return PhotoLatents(
      phase=rng.uniform(0, 2 * np.pi, (num_items, 4)).astype(np.float32),
      light=np.stack([np.cos(angle), np.sin(angle)], 1).astype(np.float32),
      bg_freq=rng.uniform(-3, 3, (num_items, 2, 2)).astype(np.float32),
      bg_phase=rng.uniform(0, 2 * np.pi, (num_items, 2)).astype(np.float32),
      bg_tint=rng.uniform(0.1, 0.6, (num_items, 3)).astype(np.float32))


def render_photos(img: synthetic.ImageLatents, photo: PhotoLatents,
                  rows: np.ndarray, size: int, rng: np.random.Generator,
                  periods: float = 6.0) -> np.ndarray:
  """Draws items `rows` as uint8 [m, size, size, 3] photo-like images.

  The product's surface is its colour times (1 + a woven texture whose four
  orientation strengths are img.contrast), lit from one side; the background
  mixes two colours through two random waves.
  """
  s, m = size, len(rows)
  yy, xx = (np.mgrid[0:s, 0:s].astype(np.float32) + 0.5) / s
  wave = sum(np.sin(2 * np.pi * (photo.bg_freq[rows, j, 0, None, None] * xx
                                 + photo.bg_freq[rows, j, 1, None, None] * yy)
                    + photo.bg_phase[rows, j, None, None]) for j in range(2))
  mix = (0.5 + 0.25 * wave)[..., None]
  out = ((1 - mix) * img.background[rows][:, None, None, :]
         + mix * photo.bg_tint[rows][:, None, None, :])
  # Woven texture: one grating per orientation, amplitude = its strength.
  u, v = xx * periods, yy * periods  # `periods` cycles across the image
  weave = sum(img.contrast[rows, q, None, None] * np.sin(
      2 * np.pi * (np.cos(t) * u + np.sin(t) * v)
      + photo.phase[rows, q, None, None])
              for q, t in enumerate(_ORIENTATIONS))
  cx = 0.5 + img.offset[rows, 0, None, None]
  cy = 0.5 + img.offset[rows, 1, None, None]
  side = ((xx - cx) * photo.light[rows, 0, None, None]
          + (yy - cy) * photo.light[rows, 1, None, None])
  shade = np.clip(0.9 + 0.6 * side / img.radius[rows, None, None], 0.6, 1.2)
  surface = (img.colour[rows][:, None, None, :]
             * (1 + 0.3 * weave * shade)[..., None] * shade[..., None])
  mask = synthetic.shape_masks(img, rows, size)
  out = np.where(mask[..., None], surface, out)
  out = out + rng.normal(0, 0.03, out.shape).astype(np.float32)
  return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def make_source(config: ml_collections.ConfigDict) -> source_lib.Source:
  """The sparse log of `config.sparse` as a streaming Source."""
  cfg, size = config.sparse, config.data.image_size
  if not 8 <= size <= 128:
    raise ValueError(f"sparse images need 8 <= image_size <= 128, got {size}")
  if not 0 < cfg.negative_keep_rate <= 1:
    raise ValueError("sparse: negative_keep_rate must be in (0, 1]")
  num_categories = cfg.num_categories + 1  # row 0 = OOV
  items, img = synthetic.sample_items(cfg.num_items, num_categories,
                                      cfg.cold_item_fraction, cfg.seed)
  counts = impression_counts(cfg.num_items, cfg.tail_exponent,
                             np.random.default_rng([cfg.seed, _COUNTS]))
  order = schedule(counts, items.is_cold, cfg.test_fraction,
                   np.random.default_rng([cfg.seed, _SCHEDULE]))
  model = synthetic.ClickModel(
      base_logit=cfg.base_logit - np.log(cfg.negative_keep_rate),
      visual_weight=cfg.visual_weight)
  sim = ScheduledSimulator(
      items, order, num_categories=num_categories, num_users=cfg.num_users,
      test_fraction=cfg.test_fraction,
      num_behaviors=config.data.num_behaviors, chunk_size=cfg.chunk_size,
      seed=cfg.seed, min_count=config.data.min_count,
      hash_buckets=config.data.hash_buckets, model=model)
  photo = photo_latents(cfg.num_items, cfg.seed)

  def item_images(batch: int = 256):
    for i, lo in enumerate(range(0, cfg.num_items, batch)):
      rows = np.arange(lo, min(lo + batch, cfg.num_items))
      yield rows, render_photos(
          img, photo, rows, size,
          np.random.default_rng([cfg.seed, _RENDER, i]))

  return source_lib.Source(
      name="sparse", image_size=size, item_category=items.category,
      num_categories=num_categories,
      sparse_features=synthetic.SPARSE_FEATURES, vocab_sizes=sim.vocab_sizes,
      num_dense=0, num_behaviors=config.data.num_behaviors,
      item_images=item_images, impressions=sim.chunks,
      vocabularies=sim.vocabularies,
      stats={"num_items": cfg.num_items, "num_impressions": len(order),
             "num_cold_items": int(sim.is_cold.sum()),
             "num_users": cfg.num_users})
