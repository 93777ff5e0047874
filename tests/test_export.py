"""Embedding-table export: contents, identity hashes, dedupe, atomic writes."""

import json
import os

from flax import nnx
import jax
import numpy as np
import pytest

from configs import tiny
from csctr.serving import export
from csctr.model import ctr
from csctr import rundir


@pytest.fixture(scope="module")
def workdir(trained_tiny_workdir):
  return trained_tiny_workdir


@pytest.fixture(scope="module")
def restored(workdir):
  return rundir.restore_model(workdir)  # (model, config, info, step)


@pytest.fixture(scope="module")
def table_path(workdir):
  path = os.path.join(workdir, export.TABLES_DIR, "6")
  if not os.path.exists(path):
    assert export.export(workdir, batch_size=48, progress=False) == path
  return path


def test_trainer_persists_config_and_info(workdir, restored):
  config, info, data_path = rundir.load_run_files(workdir)
  assert config.model.visual_dim == tiny.get_config().model.visual_dim
  assert config.num_train_steps == 6
  assert info.sparse_features == ("user_id", "item_id", "category_id",
                                  "position")
  assert os.path.exists(os.path.join(data_path, "images.npy"))
  model, config2, info2, step = restored
  assert step == 6 and info2 == info
  assert isinstance(model, ctr.CTRModel)
  assert config2.to_dict() == config.to_dict()


def test_table_holds_the_encoder_output_of_every_item(workdir, table_path,
                                                     restored):
  table = export.EmbeddingTable(table_path)
  model, config, info, step = restored
  _, _, data_path = rundir.load_run_files(workdir)
  images = np.load(os.path.join(data_path, "images.npy"))
  categories = np.load(os.path.join(data_path, "item_category.npy"))

  assert isinstance(table.embeddings, np.memmap)  # paged, not loaded
  assert table.embeddings.shape == (len(images), config.model.visual_dim)
  assert table.embeddings.dtype == np.float32
  np.testing.assert_array_equal(table.ids, np.arange(len(images)))
  np.testing.assert_array_equal(table.categories, categories)
  expected = np.asarray(jax.jit(model.encode_images)(images, categories))
  np.testing.assert_allclose(table.embeddings, expected, rtol=1e-5, atol=1e-6)
  for c in range(info.num_categories):
    if (categories == c).any():
      np.testing.assert_allclose(table.category_mean[c],
                                 expected[categories == c].mean(0), atol=1e-5)

  meta = table.meta
  assert meta["step"] == step == 6
  assert meta["d"] == config.model.visual_dim and meta["dtype"] == "float32"
  assert meta["num_rows"] == len(images) and meta["images_per_sec"] > 0
  assert meta["config_hash"] == export.config_hash(config.model, info)
  assert meta["encoder_hash"] == export.encoder_hash(model)
  parent = os.path.dirname(table_path)
  assert not [f for f in os.listdir(parent) if f.startswith(".")]  # no debris


def test_hashes_tell_models_and_checkpoints_apart(restored):
  model, config, info, _ = restored
  other = config.model.copy_and_resolve_references()
  other.attention = "cbam"
  assert export.config_hash(other, info) != export.config_hash(config.model,
                                                               info)
  assert export.config_hash(config.model.copy_and_resolve_references(),
                            info) == export.config_hash(config.model, info)
  moved = nnx.clone(model)  # another checkpoint: same shapes, other values
  nnx.update(moved.encoder, jax.tree.map(
      lambda x: x + 1e-3, nnx.state(moved.encoder, nnx.Param)))
  assert export.encoder_hash(moved) != export.encoder_hash(model)


def test_npz_source_is_deduplicated_by_id_and_batched(workdir, restored,
                                                      tmp_path):
  model, _, info, _ = restored
  rng = np.random.default_rng(0)
  s = info.image_size
  images = rng.integers(0, 256, (7, s, s, 3), dtype=np.uint8)
  ids = np.array([50, 7, 50, 900, 7, 12, 3])
  categories = np.array([1, 2, 1, 0, 2, 3, 1], np.int32)
  npz = str(tmp_path / "catalogue.npz")
  np.savez(npz, images=images, categories=categories, ids=ids)

  out = export.export(workdir, images=npz, output=str(tmp_path / "table"),
                      batch_size=3, progress=False)  # 3 batches, last padded
  table = export.EmbeddingTable(out)
  np.testing.assert_array_equal(table.ids, [3, 7, 12, 50, 900])
  assert table.meta["duplicate_ids_dropped"] == 2
  first = [6, 1, 5, 0, 3]  # first occurrence of each sorted id
  expected = np.asarray(jax.jit(model.encode_images)(
      images[first], categories[first]))
  np.testing.assert_allclose(table.embeddings, expected, rtol=1e-5, atol=1e-6)

  rows, found = table.lookup(np.array([12, 4, 900, -1, 10**9, 3]))
  np.testing.assert_array_equal(found, [True, False, True, False, False, True])
  np.testing.assert_array_equal(rows[found], [2, 4, 0])

  with pytest.raises(FileExistsError, match="overwrite"):
    export.export(workdir, images=npz, output=out, progress=False)
  export.export(workdir, images=npz, output=out, progress=False,
                overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["catalogue.npz", "table"]


def test_bad_sources_are_refused(workdir, tmp_path):
  npz = str(tmp_path / "small.npz")
  np.savez(npz, images=np.zeros((2, 8, 8, 3), np.uint8),
           categories=np.zeros(2, np.int32))
  with pytest.raises(ValueError, match=r"uint8 \[M, 16, 16, 3\]"):
    export.export(workdir, images=npz, output=str(tmp_path / "t"))
  np.savez(npz, images=np.zeros((2, 16, 16, 3), np.uint8))
  with pytest.raises(ValueError, match="lacks arrays"):
    export.export(workdir, images=npz, output=str(tmp_path / "t"))
  with pytest.raises(FileNotFoundError, match="not an embedding table"):
    export.EmbeddingTable(str(tmp_path))
  assert not os.path.exists(tmp_path / "t")


def test_meta_is_json_with_the_model_config(table_path):
  with open(os.path.join(table_path, export.META_FILE)) as f:
    meta = json.load(f)
  assert meta["format_version"] == export.FORMAT_VERSION
  assert meta["model"]["visual_dim"] == meta["d"]


def test_incremental_export_embeds_only_new_items(workdir, restored,
                                                  tmp_path):
  model, _, info, _ = restored
  rng = np.random.default_rng(1)
  s = info.image_size
  images = rng.integers(0, 256, (9, s, s, 3), dtype=np.uint8)
  categories = rng.integers(0, info.num_categories, 9).astype(np.int32)
  ids = np.array([40, 10, 30, 20, 90, 70, 60, 50, 80])
  raw = np.array([f"sku-{i}" for i in ids])
  day1, day2 = str(tmp_path / "day1.npz"), str(tmp_path / "day2.npz")
  np.savez(day1, images=images[:4], categories=categories[:4], ids=ids[:4],
           raw_ids=raw[:4])
  changed = images.copy()
  changed[:4] = 0  # day 2 lists the old items again, with other pixels
  np.savez(day2, images=changed, categories=categories, ids=ids, raw_ids=raw)
  base = export.export(workdir, images=day1, output=str(tmp_path / "t" / "6"),
                       progress=False)
  out = export.export(workdir, images=day2, base_table=base, progress=False)
  assert out == str(tmp_path / "t" / "6.1")  # the next version beside it
  old, new = export.EmbeddingTable(base), export.EmbeddingTable(out)
  assert (new.meta["new_rows"], new.meta["num_rows"]) == (5, 9)
  assert new.meta["base_table"] == base
  np.testing.assert_array_equal(new.ids, np.sort(ids))
  rows, _ = new.lookup(old.ids)  # old rows copied bit for bit, not re-embedded
  np.testing.assert_array_equal(new.embeddings[rows], old.embeddings)
  rows, _ = new.lookup(ids[4:])
  expected = np.asarray(jax.jit(model.encode_images)(images[4:],
                                                     categories[4:]))
  np.testing.assert_allclose(new.embeddings[rows], expected, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(new.raw_keys(["sku-90", "sku-10", "nope"]),
                                [90, 10, -1])
  np.testing.assert_array_equal(new.categories[new.lookup(ids)[0]],
                                categories)
  assert export.next_version(out) == str(tmp_path / "t" / "6.2")
  moved = nnx.clone(model)  # another checkpoint's base is refused
  nnx.update(moved.encoder, jax.tree.map(
      lambda x: x + 1e-3, nnx.state(moved.encoder, nnx.Param)))
  meta = {**old.meta, "encoder_hash": export.encoder_hash(moved)}
  with open(os.path.join(base, export.META_FILE), "w") as f:
    json.dump(meta, f)
  with pytest.raises(ValueError, match="another checkpoint"):
    export.export(workdir, images=day2, base_table=base, progress=False)
