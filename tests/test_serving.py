"""Scorer: equal to the training model's logits, fallbacks, bad input, export."""

import os

from flax import nnx
import jax
import numpy as np
import pytest

from configs import tiny
from csctr.data import batch as batch_lib
from csctr.serving import export
from csctr.data import pipeline
from csctr.model import ctr
from csctr import serving
from csctr import rundir
import testutil

ATOL = 1e-5


@pytest.fixture(scope="module")
def workdir(trained_tiny_workdir):
  workdir = trained_tiny_workdir
  if not os.path.exists(os.path.join(workdir, export.TABLES_DIR, "6")):
    export.export(workdir, progress=False)
  return workdir


@pytest.fixture(scope="module")
def scorer(workdir):
  return serving.Scorer.from_workdir(workdir)


@pytest.fixture(scope="module")
def restored(workdir):
  return rundir.restore_model(workdir)  # (model, config, info, step)


def _request(user, sparse, image_ids, **extra):
  """A request from rows of a batch's sparse matrix (synthetic columns)."""
  return {"user": {"user_id": int(user)},
          "candidates": {"image_id": np.asarray(image_ids),
                         "item_id": sparse[:, 1], "category_id": sparse[:, 2],
                         "position": sparse[:, 3], **extra}}


def test_scores_equal_the_trainers_eval_logits(workdir, scorer, restored):
  model, config, info, _ = restored
  _, _, data_path = rundir.load_run_files(workdir)
  images = np.load(os.path.join(data_path, "images.npy"))
  compared = 0
  for batch, logits, item, real in testutil.trainer_eval_slots(workdir,
                                                               data_path):
    np.testing.assert_array_equal(  # the mapping is right: same pixels
        batch["images"][batch["ad_image"][real]], images[item[real]])
    users = batch["sparse"][real, 0]
    for user in np.unique(users):  # one request per user and batch
      rows = real[users == user]
      result = scorer.score(_request(user, batch["sparse"][rows], item[rows]))
      np.testing.assert_allclose(result.logits, logits[rows], atol=ATOL)
      assert result.misses == 0
      compared += len(rows)
  s = config.synthetic
  assert compared == info.splits["test"].impressions == round(
      s.num_impressions * s.test_fraction)


def _candidates(workdir, n, seed=0):
  _, _, data_path = rundir.load_run_files(workdir)
  info = pipeline.load_info(data_path)
  rng = np.random.default_rng(seed)
  item_category = np.load(os.path.join(data_path, "item_category.npy"))
  items = rng.integers(0, len(item_category), n)
  category = item_category[items]
  sparse = np.stack([rng.integers(1, v, n) for v in info.vocab_sizes], 1)
  sparse[:, 2] = category
  images = np.load(os.path.join(data_path, "images.npy"))[items]
  return items, sparse, images, category


def test_cnn_fallback_embeds_misses_like_the_table(workdir, scorer):
  items, sparse, images, category = _candidates(workdir, 9)
  hit = scorer.score(_request(5, sparse, items))
  unknown = items + 10**6  # not in the table; the pixels come along
  miss = scorer.score(_request(5, sparse, unknown, images=images,
                               image_category=category))
  np.testing.assert_allclose(miss.logits, hit.logits, atol=ATOL)
  assert (miss.misses, miss.cnn_fallbacks, miss.mean_fallbacks) == (9, 9, 0)
  # No pixels: the category mean, counted as such.
  nopix = scorer.score(_request(5, sparse, unknown))
  assert (nopix.misses, nopix.cnn_fallbacks, nopix.mean_fallbacks) == (9, 0, 9)
  assert scorer.stats["misses"] >= 18


def test_category_mean_fallback(workdir, restored):
  model, config, info, _ = restored
  table = export.EmbeddingTable(os.path.join(workdir, export.TABLES_DIR, "6"))
  scorer = serving.Scorer(model, config.model, info, table,
                          serving.ServingConfig(fallback="category_mean",
                                                buckets=(16,)), step=6)
  items, sparse, images, _ = _candidates(workdir, 6, seed=1)
  ids = items.copy()
  ids[[1, 4]] = -7  # two misses; pixels are ignored under this fallback
  result = scorer.score(_request(2, sparse, ids, images=images))
  assert (result.misses, result.mean_fallbacks, result.cnn_fallbacks) == (
      2, 2, 0)
  emb = np.asarray(table.embeddings[items])
  emb[[1, 4]] = table.category_mean[sparse[[1, 4], 2]]
  batch = {"sparse": np.concatenate([np.full((6, 1), 2), sparse[:, 1:]], 1),
           "dense": np.zeros((6, 0), np.float32), "ad_image": np.arange(6)}
  expected = np.asarray(model.score(batch, emb))
  np.testing.assert_allclose(result.logits, expected, atol=ATOL)


def test_unknown_ids_go_to_oov_rows(workdir, scorer):
  items, sparse, _, _ = _candidates(workdir, 5, seed=2)
  oov = sparse.copy()
  oov[:, 1] = 0
  base = scorer.score(_request(0, oov, items)).logits
  users, item_ids = scorer.info.vocab_sizes[:2]  # one past the last rows
  for user in (10**6, -3, users):
    bad = sparse.copy()
    bad[:, 1] = [10**7, -1, item_ids, 10**9, -5]
    np.testing.assert_array_equal(
        scorer.score(_request(user, bad, items)).logits, base)


def test_empty_missing_and_bucketed_requests(workdir, scorer, restored):
  result = scorer.score({"user": {"user_id": 1},
                         "candidates": {"image_id": []}})
  assert result.logits.shape == (0,) and result.misses == 0
  assert scorer.score({"user": {"user_id": 1}}).logits.shape == (0,)
  items, sparse, _, _ = _candidates(workdir, 3)
  request = _request(1, sparse, items)
  del request["candidates"]["position"]
  with pytest.raises(KeyError, match="lacks feature 'position'"):
    scorer.score(request)
  request["user"]["position"] = 2  # a request-level value is broadcast
  sparse[:, 3] = 2
  np.testing.assert_array_equal(scorer.score(request).logits,
                                scorer.score(_request(1, sparse, items)).logits)

  assert [scorer.bucket(n) for n in (1, 16, 17, 1024)] == [16, 16, 64, 1024]
  model, config, info, step = restored
  small = serving.Scorer(model, config.model, info, scorer.table,
                         serving.ServingConfig(buckets=(4, 8),
                                               fallback="category_mean"), step)
  items, sparse, _, _ = _candidates(workdir, 21, seed=3)  # 3 chunks of 8
  chunked = small.score(_request(4, sparse, items))
  assert chunked.bucket == 8 and chunked.logits.shape == (21,)
  np.testing.assert_allclose(chunked.logits,
                             scorer.score(_request(4, sparse, items)).logits,
                             atol=ATOL)
  # Padding rows never leak into real ones: a single candidate alone.
  np.testing.assert_allclose(small.score(_request(4, sparse[:1], items[:1])
                                         ).logits, chunked.logits[:1],
                             atol=ATOL)


def test_table_of_another_model_or_checkpoint_is_refused(workdir, scorer,
                                                         restored):
  model, config, info, step = restored
  other = config.model.copy_and_resolve_references()
  other.attention = "cbam"
  with pytest.raises(ValueError, match="built from another model"):
    serving.Scorer(model, other, info, scorer.table, step=step)
  moved = nnx.clone(model)
  nnx.update(moved.encoder, jax.tree.map(
      lambda x: x * 1.01, nnx.state(moved.encoder, nnx.Param)))
  with pytest.raises(ValueError, match="another checkpoint"):
    serving.Scorer(moved, config.model, info, scorer.table, step=step)
  serving.Scorer(moved, config.model, info, scorer.table, serving.ServingConfig(
      buckets=(16,), fallback="category_mean", allow_other_checkpoint=True,
      warmup_calls=0), step)
  with pytest.raises(FileNotFoundError, match="csctr.export"):
    serving.Scorer.from_workdir(workdir, table_path=os.path.join(workdir, "x"))


def _random_model(model_config, info, seed):
  """A model with seeded random parameters, without compiling an init.

  (Initialising through the layers' initializers costs an XLA compile of
  seconds; any parameter values serve an equivalence test.)
  """
  abstract = nnx.eval_shape(
      lambda: ctr.build_model(model_config, info, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda x: jax.numpy.asarray(
      0.2 * rng.standard_normal(x.shape), x.dtype), state)
  return nnx.merge(graphdef, state)


def test_dicm_behaviours_and_dense_match_the_model(tmp_path):
  """Multi-query behaviour pooling + dense features, against model(batch)."""
  model_config = tiny.get_config().model
  model_config.behavior_pooling = "multi_query"
  info = batch_lib.DataInfo(("user_id", "item_id", "category_id", "position"),
                            (10, 20, 4, 5), num_dense=2, num_categories=4,
                            image_size=16, num_behaviors=3)
  model = _random_model(model_config, info, seed=3)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (30, 16, 16, 3), dtype=np.uint8)
  categories = rng.integers(0, 4, 30).astype(np.int32)
  source = export.ImageSource(100 + np.arange(30), images, categories, "rand")
  meta = {"step": 0, "config_hash": export.config_hash(model_config, info),
          "encoder_hash": export.encoder_hash(model)}
  export.write_table(str(tmp_path / "t"), model, source, num_categories=4,
                     meta=meta, batch_size=16, progress=False)
  table = export.EmbeddingTable(str(tmp_path / "t"))
  scorer = serving.Scorer(model, model_config, info, table,
                          serving.ServingConfig(buckets=(8,),
                                                fallback="category_mean"),
                          step=0)

  n, cand = 5, np.array([3, 17, 3, 29, 8])  # rows of `images`
  sparse = np.stack([np.full(n, 7), rng.integers(0, 20, n),
                     categories[cand], rng.integers(0, 5, n)], 1)
  dense = rng.normal(size=(n, 2)).astype(np.float32)
  behavior = [104, 999, 111]  # 999: not in the table -> masked, counted
  request = {
      "user": {"user_id": 7}, "behavior_ids": np.array(behavior),
      "candidates": {"image_id": 100 + cand, "item_id": sparse[:, 1],
                     "category_id": sparse[:, 2], "position": sparse[:, 3],
                     "dense": dense}}
  result = scorer.score(request)
  assert result.behavior_misses == 1 and result.misses == 0

  rows = np.concatenate([cand, [4, 0, 11]])  # unique-image table, contract
  batch = {"images": images[rows], "image_category": categories[rows],
           "image_mask": np.ones(8, bool), "ad_image": np.arange(n),
           "behavior_images": np.tile([5, 6, 7], (n, 1)),
           "behavior_mask": np.tile([True, False, True], (n, 1)),
           "sparse": sparse.astype(np.int32), "dense": dense}
  expected = np.asarray(jax.jit(lambda b: model(b))(batch))
  np.testing.assert_allclose(result.logits, expected, atol=ATOL)

  # Merged requests (as the server's micro-batches): each request keeps its
  # own behaviours; 13 rows over buckets of 8 split across requests.
  other = {"user": {"user_id": 2}, "behavior_ids": np.array([111, 127]),
           "candidates": {k: v[:3] for k, v in request["candidates"].items()}}
  merged = scorer.score_many([request, other, request])
  for got, alone in zip(merged, [result, scorer.score(other), result]):
    np.testing.assert_allclose(got.logits, alone.logits, atol=1e-6)
    assert got.behavior_misses == alone.behavior_misses
  assert [len(r.logits) for r in merged] == [5, 3, 5]


def test_stablehlo_round_trip(scorer, tmp_path):
  pytest.importorskip("flatbuffers")  # jax.export's serialization needs it
  paths = scorer.export_stablehlo(str(tmp_path), buckets=(16,))
  assert paths == [str(tmp_path / "score_n16.jax_exported")]
  assert os.path.getsize(tmp_path / "score_n16.mlirbc") > 0
  with open(paths[0], "rb") as f:
    exported = jax.export.deserialize(f.read())
  rng = np.random.default_rng(4)
  sparse = np.stack([rng.integers(0, v, 16) for v in scorer.info.vocab_sizes],
                    1).astype(np.int32)
  ad = np.asarray(scorer.table.embeddings[rng.integers(0, len(scorer.table),
                                                      16)])
  args = (sparse, np.zeros((16, 0), np.float32), ad,
          np.zeros((0, ad.shape[1]), np.float32), np.zeros((0,), bool))
  np.testing.assert_allclose(
      np.asarray(exported.call(*args)),
      np.asarray(scorer._score_jit(  # pylint: disable=protected-access
          scorer._state, *args[:3], args[3][None], args[4][None],  # pylint: disable=protected-access
          np.zeros(16, np.int32))),
      atol=1e-6)
