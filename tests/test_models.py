"""CTRModel: exact grouping, inert padding, gradients, every choice runs."""

import copy

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from csctr.data import batch as batch_lib
from csctr.model import heads
from csctr.model import ctr
from csctr.model import embeddings
from testutil import jit_o0, rbg_rngs

INFO = batch_lib.DataInfo(
    sparse_features=("user_id", "item_id", "category_id", "shop_id"),
    vocab_sizes=(30, 40, 6, 7), num_dense=2, num_categories=6, image_size=16,
    num_behaviors=3)
G, K, U = 3, 4, 6
B = G * K
# Table rows: each vocabulary padded to model.table_row_multiple.
TABLE_ROWS = sum(embeddings.padded_rows(
    v, default.get_config().model.table_row_multiple) for v in INFO.vocab_sizes)


def _config(**overrides):
  cfg = default.get_config().model
  cfg.update(dict(small_channels=(4, 8), visual_dim=6, embed_dim=3,
                  mlp_dims=(8,), cross_layers=2, channel_prior_dim=2,
                  reduction=2, behavior_pooling="attentive"))
  cfg.update(overrides)
  return cfg


def _batch(seed=0, **kw):
  b = batch_lib.dummy_batch(INFO, G, K, U, seed=seed)
  b.update(kw)
  return b


def _jnp(b):
  return {k: jnp.asarray(v) for k, v in b.items()}


@pytest.fixture(scope="module")
def model():
  return ctr.build_model(_config(), INFO, rbg_rngs())


def _with_params_of(model, cfg):
  """A model built from `cfg` that shares `model`'s parameters (same tree).

  Only the static config (dtype, late_fusion) differs; this skips an init.
  """
  abstract = nnx.eval_shape(lambda: ctr.build_model(cfg, INFO, rbg_rngs()))
  return nnx.merge(nnx.split(abstract)[0], nnx.state(model))


@pytest.fixture(scope="module")
def forward():
  return jit_o0(lambda m, b: m(b))


def test_logits_shape_dtype_and_never_cnn_per_impression(model, forward):
  logits = forward(model, _jnp(_batch()))
  assert logits.shape == (B,) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s, b: nnx.merge(graphdef, s)(b))(
      state, _jnp(_batch()))
  # A CNN layer is a conv, or on CPU one im2col matmul over maps
  # [rows, H, W, 9C] (csctr/model/conv.py): either way it sees U rows. (The
  # spatial attention's 7x7 conv is multiply-adds of planes, not counted.)
  convs = [e for e in _eqns(jaxpr.jaxpr)
           if e.primitive.name == "conv_general_dilated" or (
               e.primitive.name == "dot_general"
               and e.invars[0].aval.ndim == 4)]
  assert len(convs) == 2  # the 2 CNN layers
  assert all(e.invars[0].aval.shape[0] == U for e in convs)


def _eqns(jaxpr):
  """All equations of a jaxpr, nested ones (pjit, custom_jvp...) included."""
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        if hasattr(sub, "eqns"):
          yield from _eqns(sub)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          yield from _eqns(sub.jaxpr)


def _expanded(b):
  """The same impressions with one image row per impression (no grouping)."""
  ad = b["ad_image"]
  e = dict(b)
  e["images"] = np.concatenate([b["images"][ad], b["images"]])
  e["image_category"] = np.concatenate([b["image_category"][ad],
                                        b["image_category"]])
  e["image_mask"] = np.concatenate([b["image_mask"][ad], b["image_mask"]])
  e["ad_image"] = np.arange(B, dtype=np.int32)
  e["behavior_images"] = b["behavior_images"] + B
  return e


def test_grouping_is_exact(model, forward):
  b = _batch(seed=1)
  grouped = forward(model, _jnp(b))
  expanded = _expanded(b)
  assert expanded["images"].shape[0] == B + U
  np.testing.assert_allclose(forward(model, _jnp(expanded)), grouped,
                             rtol=1e-5, atol=1e-5)


def test_padding_rows_change_nothing(model, forward):
  b = _batch(seed=2)
  b["image_mask"][U - 1] = False  # a padding image row
  b["behavior_images"][0, :] = U - 1  # real row 0 points at it: inert
  b["behavior_mask"][0, :] = True
  b["behavior_mask"][1, :] = False  # an all-masked behaviour list
  real = b["weight"] > 0
  assert 0 < real.sum() < B
  base = forward(model, _jnp(b))

  rng = np.random.default_rng(3)
  p = copy.deepcopy(b)
  p["images"][U - 1] = rng.integers(0, 256, p["images"][U - 1].shape)
  p["image_category"][U - 1] = (p["image_category"][U - 1] + 1) % 6
  off = ~p["behavior_mask"]
  p["behavior_images"][off] = (p["behavior_images"][off] + 1) % U
  p["sparse"][~real] = 0
  p["dense"][~real] = 99.0
  p["ad_image"][~real] = U - 1
  pert = forward(model, _jnp(p))
  np.testing.assert_array_equal(np.asarray(pert)[real], np.asarray(base)[real])
  assert not np.allclose(pert[~real], base[~real])  # the perturbation bites


def test_score_sees_images_only_through_embeddings(model):
  b = _jnp(_batch(seed=4))

  @jit_o0
  def both(m, b):
    emb = m.encode_images(b["images"], b["image_category"])
    blank = dict(b, images=jnp.zeros_like(b["images"]),
                 image_category=jnp.zeros_like(b["image_category"]))
    return m(b), m.score(blank, emb), emb

  full, split, emb = both(model, b)
  assert emb.shape == (U, 6)
  np.testing.assert_array_equal(full, split)


def _loss_from_logits(logits, b):
  """Weighted sigmoid cross entropy (padding impressions weigh 0)."""
  bce = (jnp.maximum(logits, 0) - logits * b["label"]
         + jnp.log1p(jnp.exp(-jnp.abs(logits))))
  return jnp.sum(b["weight"] * bce) / jnp.sum(b["weight"])


def _loss(m, b):
  return _loss_from_logits(m(b), b)


def _grad_norms(grads):
  return {ctr.param_label(p) + ":" + "/".join(map(str, p)):
          float(jnp.abs(v[...]).sum())
          for p, v in nnx.to_flat_state(grads)}


def test_gradients_reach_priors_cnn_head_and_ids(model):
  grads = jit_o0(nnx.grad(_loss))(model, _jnp(_batch(seed=5)))
  norms = _grad_norms(grads)
  for needle in ("attns/0/channel_prior", "attns/1/spatial_prior",
                 "convs/0/kernel", "backbone/fc/kernel", "head/cross/kernel",
                 "head/logit/kernel", "pooling/image_query/score/kernel",
                 "id_embed/user_id/embedding", "id_embed/shop_id/embedding"):
    hits = [v for k, v in norms.items() if needle in k]
    assert len(hits) == 1 and hits[0] > 0, (needle, hits)
  assert all(np.isfinite(v) for v in norms.values())


def test_late_fusion_freezes_encoder_only(model):
  m = _with_params_of(model, _config(late_fusion=True))
  norms = _grad_norms(jit_o0(nnx.grad(_loss))(m, _jnp(_batch(seed=5))))
  enc = {k: v for k, v in norms.items() if "encoder" in k}
  rest = {k: v for k, v in norms.items() if "encoder" not in k}
  assert enc and all(v == 0 for v in enc.values())
  assert sum(rest.values()) > 0
  assert all(ctr.is_encoder_param(k.split(":")[1].split("/")) for k in enc)


@pytest.mark.parametrize("kind,use_category,depends", [
    ("cscnn", True, True), ("cscnn", False, False), ("cbam", True, False),
    ("se", True, False), ("none", True, False)])
def test_category_conditioning(kind, use_category, depends):
  m = ctr.build_model(
      _config(attention=kind, use_category=use_category, small_channels=(4,),
              behavior_pooling="none"), INFO, rbg_rngs())
  img = _batch()["images"][:1]
  emb = jit_o0(lambda m, x, c: m.encode_images(x, c))(
      m, jnp.asarray(np.concatenate([img, img])), jnp.array([1, 4], jnp.int32))
  assert emb.shape == (2, 6)
  differs = float(jnp.max(jnp.abs(emb[0] - emb[1]))) > 1e-5
  assert differs == depends


def test_bfloat16_end_to_end(model, forward):
  m16 = _with_params_of(model, _config(dtype="bfloat16"))
  assert all(p.dtype == jnp.float32
             for p in jax.tree.leaves(nnx.state(m16, nnx.Param)))
  b = _jnp(_batch(seed=6))

  def loss(m, b):
    logits = m(b)
    return _loss_from_logits(logits, b), logits

  (loss16, logits16), grads = jit_o0(nnx.value_and_grad(loss, has_aux=True))(
      m16, b)
  assert logits16.dtype == jnp.float32 and np.isfinite(float(loss16))
  assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g))
             for g in jax.tree.leaves(grads))
  # Same float32 parameters: bf16 compute tracks float32 compute.
  logits32 = forward(model, b)
  np.testing.assert_allclose(logits16, logits32, atol=0.1 + 0.05 * float(
      jnp.max(jnp.abs(logits32))))


def test_no_image_baseline():
  m = ctr.build_model(_config(use_image=False, behavior_pooling="none"),
                         INFO, rbg_rngs())
  assert m.encoder is None
  b = _jnp(_batch())
  assert m.encode_images(b["images"], b["image_category"]) is None
  assert jit_o0(lambda m, b: m.score(b, None))(m, b).shape == (B,)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  in_dim = 4 * 3 + 2
  assert n == TABLE_ROWS * 3 + heads.head_num_params(
      "dcn", in_dim, 2, 0, (8,))


@pytest.mark.parametrize("pooling", ctr.POOLING_CHOICES)
@pytest.mark.parametrize("head", heads.HEAD_CHOICES)
def test_every_pooling_and_head_traces(pooling, head):
  cfg = _config(behavior_pooling=pooling, head=head, cross_low_rank=2)
  m = nnx.eval_shape(lambda: ctr.build_model(cfg, INFO, rbg_rngs()))
  b = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _batch().items()}
  out = nnx.eval_shape(lambda m, b: m(b), m, b)
  assert out.shape == (B,) and out.dtype == jnp.float32
  pooled = {"none": 0, "multi_query": 12}.get(pooling, 6)
  assert m.in_dim == 4 * 3 + 2 + 6 + pooled


def test_model_param_count_by_formula(model):
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  d, e, s = 6, 3, 16
  # small CNN (4, 8) with cscnn after each conv (C' = 2, r = 2, 7x7).
  def attn(c, h):
    hid = c // 2
    return ((c + 2) * hid + hid + hid * c + c + 6 * 2 + 49 * 3 + 1
            + 6 * h * h)
  cnn = (27 * 4 + 4 + attn(4, s)) + (36 * 8 + 8 + attn(8, s // 2)) + 8 * d + d
  din = 4 * d * 80 + 80 + 80 * 40 + 40 + 40 + 1  # attentive pooling unit
  in_dim = 4 * e + 2 + d + d
  assert n == (TABLE_ROWS * e + cnn + din
               + heads.head_num_params("dcn", in_dim, 2, 0, (8,)))


def test_param_label_splits_id_tables(model):
  state = nnx.state(model, nnx.Param)
  labels = {p: ctr.param_label(p) for p, _ in nnx.to_flat_state(state)}
  embed = {p for p, l in labels.items() if l == "embed"}
  assert embed == {("id_embed", f, "embedding") for f in INFO.sparse_features}
  assert any("channel_prior" in p for p, l in labels.items() if l == "dense")
  # Same answer on jax tree paths (what optax.multi_transform labels see).
  tree_labels = jax.tree_util.tree_map_with_path(
      lambda p, _: ctr.param_label(p), state)
  assert sorted(jax.tree.leaves(tree_labels)) == sorted(labels.values())


def test_behavior_pooling_masks_and_formulas():
  rng = np.random.default_rng(7)
  ad = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  beh = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
  beh = beh.at[0, 1].set(jnp.nan)  # a masked slot may hold anything
  mask = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
  bn = np.where(mask[..., None], np.asarray(beh), 0)
  kw = dict(dtype=jnp.float32, rngs=rbg_rngs())
  out = {k: ctr.BehaviorPooling(k, 4, 3, **kw)
         for k in ("sum", "max", "attentive", "multi_query")}
  np.testing.assert_allclose(out["sum"](ad, beh, mask), bn.sum(1), rtol=1e-6)
  mx = out["max"](ad, beh, mask)
  np.testing.assert_allclose(mx[0], bn[0, [0, 2, 3]].max(0))
  np.testing.assert_array_equal(mx[1], 0)
  att = out["attentive"]
  a = att.image_query
  q = np.broadcast_to(np.asarray(ad)[:, None], bn.shape)
  h = np.concatenate([q, bn, q - bn, q * bn], -1)
  for layer in a.mlp.layers:
    h = np.maximum(h @ np.asarray(layer.kernel[...]) + np.asarray(
        layer.bias[...]), 0)
  w = (h @ np.asarray(a.score.kernel[...]))[..., 0] + float(a.score.bias[0])
  expected = np.einsum("bl,bld->bd", np.where(mask, w, 0), bn)
  np.testing.assert_allclose(att(ad, beh, mask), expected, rtol=1e-5,
                             atol=1e-6)
  ad_id = jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)
  mq = out["multi_query"](ad, beh, mask, ad_id)
  assert mq.shape == (3, 8) and np.all(np.isfinite(mq))
  np.testing.assert_array_equal(mq[1], 0)
  assert np.all(np.isfinite(att(ad, beh, mask)))


def test_build_model_rejects_inconsistent_configs():
  with pytest.raises(ValueError):
    ctr.build_model(_config(use_image=False), INFO, rbg_rngs())
  with pytest.raises(ValueError):
    ctr.build_model(_config(), batch_lib.DataInfo(
        INFO.sparse_features, INFO.vocab_sizes, 2, 6, 16), rbg_rngs())
  with pytest.raises(KeyError):
    ctr.build_model(_config(behavior_pooling="multi_query"),
                       batch_lib.DataInfo(("user_id",), (5,), 0, 6, 16, 3),
                       rbg_rngs())
  with pytest.raises(ValueError):
    ctr.build_model(_config(dtype="float16"), INFO, rbg_rngs())


def test_item_backoff_gives_oov_items_their_image_only():
  """Content back-off: an OOV item_id adds a projection of its image."""
  m = ctr.build_model(_config(item_backoff=True, behavior_pooling="none"),
                      INFO, rbg_rngs())
  fwd = jit_o0(lambda mod, b: mod(b))
  b = _batch()
  item = b["sparse"][:, 1].copy()
  item[: B // 2] = 0  # the first half of the impressions: OOV items
  item[B // 2:] = np.maximum(item[B // 2:], 1)
  b["sparse"][:, 1] = item
  base = np.asarray(fwd(m, _jnp(b)))
  m.backoff.kernel.value = m.backoff.kernel.value * 3.0 + 0.5
  changed = np.asarray(fwd(m, _jnp(b)))
  oov = item == 0
  real = b["weight"] > 0
  assert not np.allclose(base[oov & real], changed[oov & real])
  np.testing.assert_array_equal(base[~oov], changed[~oov])
  with pytest.raises(ValueError, match="item_backoff needs use_image"):
    ctr.build_model(_config(item_backoff=True, use_image=False,
                            behavior_pooling="none"), INFO, rbg_rngs())
