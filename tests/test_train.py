"""End to end on the real pipeline: train, evaluate, checkpoint, resume; losses."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from csctr.training import checkpointing
from csctr.training import losses
from csctr.training import mesh as mesh_lib
from csctr import configlib
from csctr import metrics
from csctr import rundir
from csctr.training import loop as train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def _config(data_dir, **overrides):
  config = tiny.get_config()
  config.data_dir = data_dir
  for key, value in overrides.items():
    configlib.set_path(config, key, value)
  return config


def _mtimes(directory):
  return {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns
          for r, _, files in os.walk(directory) for f in files}


def test_train_evaluate_checkpoint_and_resume(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = _config(data_dir)
  record = train.train_and_evaluate(config, workdir)
  total, s = config.num_train_steps, config.synthetic
  every, keep = config.checkpoint_every, config.keep_checkpoints

  assert record["step"] == total and record["split"] == "test"
  assert set(record) == {"step", "split", *metrics.EVAL_FIELDS}
  for key in ("auc", "gauc", "logloss", "calibration", "cold_auc"):
    assert np.isfinite(record[key]), key
  assert 0.5 < record["bayes_auc"] < 1.0
  # The whole test split, no padding.
  assert record["num_impressions"] == round(s.num_impressions * s.test_fraction)
  with open(os.path.join(workdir, "eval_metrics.jsonl")) as f:
    log = [json.loads(line) for line in f]
  assert [e["step"] for e in log] == list(
      range(config.eval_every, total + 1, config.eval_every))
  assert log[-1] == record
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert checkpointing.Checkpointer(ckpt_dir, keep=keep).all_steps() == list(
      range(total - (keep - 1) * every, total + 1, every))
  with open(os.path.join(ckpt_dir, str(total), "data",
                         "process_0-of-1.json")) as f:
    assert json.load(f)  # the Grain iterator position sits beside the state

  # Same command again: restores the last step and returns its eval, trains
  # nothing.
  before = _mtimes(ckpt_dir)
  again = train.train_and_evaluate(config, workdir)
  assert again == record
  assert _mtimes(ckpt_dir) == before
  with open(os.path.join(workdir, "eval_metrics.jsonl")) as f:
    assert [json.loads(line) for line in f] == log


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir,
                                                              tmp_path):
  # A huge constant SGD step: parameters reach ~1e35 after step 1, and the
  # next forward pass overflows.
  config = _config(data_dir, **{
      "optim.dense_optimizer": "sgd", "optim.lr": 1e35,
      "optim.warmup_steps": 0, "optim.schedule": "constant",
      "checkpoint_every": 1, "log_every": 100, "eval_every": 100})
  workdir = str(tmp_path / "nan")
  with pytest.raises(FloatingPointError, match=r"non-finite loss at step \d+"
                     ) as err:
    train.train_and_evaluate(config, workdir)
  bad = int(re.search(r"step (\d+)", str(err.value)).group(1))
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=2)
  assert ckpt.latest_step() == bad - 1  # every good step saved, the bad one not
  assert not os.path.exists(os.path.join(workdir, "eval_metrics.jsonl"))


def test_bce_loss_ignores_padding():
  logits = jnp.array([0.5, -1.0, 3.0, 100.0])
  batch = {"label": jnp.array([1.0, 0.0, 1.0, 0.0]),
           "weight": jnp.array([1.0, 1.0, 1.0, 0.0])}
  p = 1 / (1 + np.exp(-np.array([0.5, -1.0, 3.0])))
  expected = -np.mean(np.log([p[0], 1 - p[1], p[2]]))
  np.testing.assert_allclose(losses.bce_loss(logits, batch), expected, rtol=1e-6)
  batch["weight"] = jnp.zeros(4)
  assert float(losses.bce_loss(logits, batch)) == 0.0


def test_bpr_loss_pairs_within_user_then_batch():
  rng = np.random.default_rng(0)
  b = 12
  logits = rng.normal(size=b).astype(np.float32)
  label = np.array([1, 0, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1], np.float32)
  user = np.array([0, 0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 5], np.int32)
  weight = np.ones(b, np.float32)
  weight[-1] = 0.0  # a padding positive of user 5: no pairs
  # Positive 0 (user 0): negatives 1, 2. 3 (user 1): 4. 5 (user 2, no
  # negative of its own): every real negative. 6 (user 3): 7. 8 (user 4):
  # every real negative.
  negatives = np.flatnonzero((label == 0) & (weight > 0))
  pairs = {0: [1, 2], 3: [4], 5: negatives, 6: [7], 8: negatives}
  per_pos = [np.mean([np.log1p(np.exp(-(logits[i] - logits[j]))) for j in js])
             for i, js in pairs.items()]
  batch = {"label": jnp.array(label), "weight": jnp.array(weight),
           "user_id": jnp.array(user)}
  np.testing.assert_allclose(losses.bpr_loss(jnp.array(logits), batch),
                             np.mean(per_pos), rtol=1e-5)
  grad = jax.grad(losses.bpr_loss)(jnp.array(logits), batch)
  assert float(grad[-1]) == 0.0 and np.all(np.isfinite(grad))


def test_partition_rules_shard_only_id_tables():
  config = tiny.get_config()
  mesh = mesh_lib.make_mesh(config)
  assert not config.mesh.fsdp

  def spec(path, shape, shard_embeddings):
    return mesh_lib.partition_spec(path, shape, mesh, shard_embeddings,
                                   config.mesh.fsdp, config.mesh.fsdp_min_size,
                                   config.mesh.embedding_axes)

  embed = ("id_embed", "user_id", "embedding")
  table = (config.synthetic.num_users + 1, config.model.embed_dim)  # + OOV
  assert spec(embed, table, True) == jax.sharding.PartitionSpec("model", None)
  assert spec(embed, table, False) == jax.sharding.PartitionSpec()
  # The embedding optimizer's slot for the table follows the table.
  slot = ("embed_opt", "accumulator") + embed
  assert spec(slot, table, True) == jax.sharding.PartitionSpec("model", None)
  dense = ("head", "mlp", "layers", 0, "kernel")
  assert spec(dense, (64, 16), True) == jax.sharding.PartitionSpec()


def test_truncate_eval_log_drops_later_and_partial_lines(tmp_path):
  path = tmp_path / "eval_metrics.jsonl"
  lines = [json.dumps({"step": s, "split": "test", "auc": 0.5}) for s in (6, 12)]
  path.write_text("\n".join(lines) + '\n{"step": 18, "spl')  # killed mid-write
  rundir.truncate_eval_log(str(tmp_path), 6)
  assert path.read_text() == lines[0] + "\n"
  rundir.truncate_eval_log(str(tmp_path / "absent"), 6)  # no log yet: no-op
