"""CTR models: a packed batch in, one float32 logit per impression out.

    images[U] --encode_images--> E [U, d]          CNN once per unique image
    E[ad_image]          -> visual embedding [B, d]
    E[behavior_images]   -> behaviour pooling [B, d or 2d]        (DICM)
    x0 = concat(ID embeddings, dense, visual, behaviour) -> head -> logit [B]

`score(batch, E)` runs everything after the CNN and sees the images only
through E, so an offline embedding table can replace the encoder at serving
time. Ad and behaviour images share one encoder call (the unique-image table
holds both), as in Alibaba's AMS.

Behaviour pooling (DICM, Ge et al., CIKM 2018):
  sum / max    masked sum or max over the L behaviour embeddings.
  attentive    DIN activation unit (Zhou et al., KDD 2018): the ad image
               embedding q scores each behaviour k with MLP([q; k; q-k; q*k]);
               output sum_j a_j k_j over unmasked j. As in the DIN paper the
               weights are not softmax-normalised (the summed weight carries
               the intensity of interest), and masked entries weigh exactly 0.
  multi_query  two such units, queried by the ad image embedding and by the
               ad ID (item_id) embedding projected to d; outputs concatenated.
A row with every behaviour masked pools to zeros.
"""

from __future__ import annotations

import functools
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from csctr.model import attention as attention_lib
from csctr.model import backbones
from csctr.model import embeddings
from csctr.data import batch as batch_lib
from csctr.model import heads

POOLING_CHOICES = ("none", "sum", "max", "attentive", "multi_query")
ATTENTION_UNIT_DIMS = (80, 40)  # DIN's activation-unit MLP

# ImageNet statistics (in uint8 units): the convention of CNN-F and ResNet.
_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255.0
_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255.0


def normalize_images(images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """uint8 [..., H, W, 3] -> standardised floats.

  Runs on device, so batches ship uint8 (4x fewer bytes than float32).
  """
  x = (images.astype(jnp.float32) - _MEAN) / _STD
  return x.astype(dtype)


class ImageEncoder(nnx.Module):
  """uint8 images [U, H, W, 3], categories [U] -> visual embeddings [U, d]."""

  def __init__(self, config: ml_collections.ConfigDict,
               info: batch_lib.DataInfo, *, dtype: Any, rngs: nnx.Rngs):
    spec = attention_lib.AttentionSpec(
        kind=config.attention, num_categories=info.num_categories,
        channel_prior_dim=config.channel_prior_dim,
        reduction=config.reduction, spatial_kernel=config.spatial_kernel)
    self.dtype = dtype
    self.backbone = backbones.build_backbone(
        config.backbone, info.image_size, config.visual_dim, spec,
        small_channels=tuple(config.small_channels), fc_dim=config.fc_dim,
        resnet_width=config.resnet_width,
        # .get: configs of runs from before fc_dropout existed.
        fc_dropout=config.fc_dropout, dtype=dtype, rngs=rngs)

  def __call__(self, images: jax.Array, categories: jax.Array,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    return self.backbone(normalize_images(images, self.dtype), categories,
                         dropout_rng=dropout_rng)


class AttentionUnit(nnx.Module):
  """DIN activation unit: a_j = MLP([q; k_j; q-k_j; q*k_j]); sum_j a_j k_j."""

  def __init__(self, dim: int, *, dtype: Any, rngs: nnx.Rngs):
    self.mlp = heads.MLP(4 * dim, ATTENTION_UNIT_DIMS, dtype=dtype, rngs=rngs)
    self.score = nnx.Linear(self.mlp.out_dim, 1, dtype=dtype, rngs=rngs)

  def __call__(self, query: jax.Array, keys: jax.Array,
               mask: jax.Array) -> jax.Array:
    q = jnp.broadcast_to(query[:, None, :], keys.shape)
    a = self.score(self.mlp(jnp.concatenate([q, keys, q - keys, q * keys], -1)))
    a = jnp.where(mask, a[..., 0], 0)  # [B, L]
    return jnp.einsum("bl,bld->bd", a, keys)


class BehaviorPooling(nnx.Module):
  """DICM pooling of behaviour-image embeddings [B, L, d] -> [B, out_dim]."""

  def __init__(self, kind: str, dim: int, id_dim: int, *, dtype: Any,
               rngs: nnx.Rngs):
    if kind not in POOLING_CHOICES or kind == "none":
      raise ValueError(
          f"behavior_pooling={kind!r} not in {POOLING_CHOICES[1:]}")
    self.kind = kind
    self.out_dim = 2 * dim if kind == "multi_query" else dim
    if kind in ("attentive", "multi_query"):
      self.image_query = AttentionUnit(dim, dtype=dtype, rngs=rngs)
    if kind == "multi_query":
      self.id_query_proj = nnx.Linear(id_dim, dim, use_bias=False, dtype=dtype,
                                      rngs=rngs)
      self.id_query = AttentionUnit(dim, dtype=dtype, rngs=rngs)

  def __call__(self, ad: jax.Array, behaviors: jax.Array, mask: jax.Array,
               ad_id: jax.Array | None = None) -> jax.Array:
    # Zero masked keys first so that nothing from a padding row (not even a
    # non-finite value) can leak through 0 * x.
    behaviors = jnp.where(mask[..., None], behaviors, 0)
    if self.kind == "sum":
      return jnp.sum(behaviors, axis=1)
    if self.kind == "max":
      m = jnp.max(jnp.where(mask[..., None], behaviors, -jnp.inf), axis=1)
      return jnp.where(jnp.any(mask, axis=1)[:, None], m, 0)
    pooled = self.image_query(ad, behaviors, mask)
    if self.kind == "multi_query":
      q = self.id_query_proj(ad_id)
      pooled = jnp.concatenate([pooled, self.id_query(q, behaviors, mask)], -1)
    return pooled


class CTRModel(nnx.Module):
  """Visual-aware CTR model (CSCNN + DCN, DICM behaviour pooling, ablations)."""

  def __init__(self, config: ml_collections.ConfigDict,
               info: batch_lib.DataInfo, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    if dtype not in (jnp.float32, jnp.bfloat16):
      raise ValueError(f"dtype={config.dtype!r} must be float32 or bfloat16")
    self.dtype = dtype
    self.use_image = bool(config.use_image)
    self.use_category = bool(config.use_category)
    self.late_fusion = bool(config.late_fusion)
    self.sparse_features = tuple(info.sparse_features)
    self.num_dense = info.num_dense
    # Tables stay float32 and are looked up in float32; only the gathered rows
    # are cast (nnx.Embed(dtype=bf16) would cast the whole table every step).
    # Rows padded to config.table_row_multiple so that sharded tables split
    # evenly (csctr/model/embeddings.py); padding rows are never looked up.
    # Drawn by embeddings.table_init: as nnx.Embed's own init, but row by
    # row for huge tables (bounded memory, each shard in place).
    init = functools.partial(embeddings.table_init,
                             groups=config.table_row_multiple)
    self.id_embed = nnx.Dict({
        name: nnx.Embed(
            embeddings.padded_rows(vocab, config.table_row_multiple),
            config.embed_dim, embedding_init=init, rngs=rngs)
        for name, vocab in zip(info.sparse_features, info.vocab_sizes)})
    in_dim = len(info.sparse_features) * config.embed_dim + info.num_dense
    encoder = pooling_module = None
    if self.use_image:
      encoder = ImageEncoder(config, info, dtype=dtype, rngs=rngs)
      in_dim += config.visual_dim
    self.encoder = nnx.data(encoder)
    # Content back-off for cold start: an item in the OOV row (never seen,
    # rarer than min_count, or dropped by id_dropout) gets the OOV vector
    # plus a learned projection of its image embedding, so its item_id slot
    # says something about this item rather than about all rare items.
    backoff = None
    if config.item_backoff:
      if not self.use_image:
        raise ValueError("item_backoff needs use_image=True")
      self.item_col = info.feature_index("item_id")
      backoff = nnx.Linear(config.visual_dim, config.embed_dim, dtype=dtype,
                           rngs=rngs)
    self.backoff = nnx.data(backoff)
    pooling = config.behavior_pooling
    if pooling != "none":
      if not self.use_image:
        raise ValueError(f"behavior_pooling={pooling!r} needs use_image=True")
      if not info.num_behaviors:
        raise ValueError(f"behavior_pooling={pooling!r} needs behaviour "
                         "images (DataInfo.num_behaviors > 0)")
      if pooling == "multi_query":
        info.feature_index("item_id")  # the ad ID query; KeyError if absent
      pooling_module = BehaviorPooling(pooling, config.visual_dim,
                                       config.embed_dim, dtype=dtype, rngs=rngs)
      in_dim += pooling_module.out_dim
    self.pooling = nnx.data(pooling_module)
    self.in_dim = in_dim
    self.head = heads.CTRHead(
        config.head, in_dim, cross_layers=config.cross_layers,
        cross_low_rank=config.cross_low_rank, mlp_dims=tuple(config.mlp_dims),
        dtype=dtype, rngs=rngs)

  def encode_images(self, images: jax.Array, categories: jax.Array,
                    dropout_rng: jax.Array | None = None) -> jax.Array | None:
    """uint8 [U, H, W, 3], int32 [U] -> [U, d] (None when use_image=False)."""
    if self.encoder is None:
      return None
    if not self.use_category:
      categories = jnp.zeros_like(categories)  # every image in the OOV row
    emb = self.encoder(images, categories, dropout_rng)
    # Late fusion: the visual features are fixed inputs to the CTR model.
    return jax.lax.stop_gradient(emb) if self.late_fusion else emb

  def score(self, batch: dict[str, jax.Array],
            image_embeddings: jax.Array | None,
            id_embeddings: dict[str, jax.Array] | None = None) -> jax.Array:
    """Logits float32 [B] from the batch and the unique-image embeddings.

    `id_embeddings` ({feature: [B, embed_dim]}) replaces the table lookups:
    the train step gathers the rows itself (csctr/model/embeddings.py) so
    that it can differentiate them instead of the tables.
    """
    if id_embeddings is None:
      sparse = batch["sparse"]
      id_embeddings = {name: self.id_embed[name](sparse[:, i])
                       for i, name in enumerate(self.sparse_features)}
    ids = {name: id_embeddings[name].astype(self.dtype)
           for name in self.sparse_features}
    if self.use_image:
      emb = image_embeddings.astype(self.dtype)
      ad = emb[batch["ad_image"]]
      if self.backoff is not None:
        oov = batch["sparse"][:, self.item_col] == 0
        ids["item_id"] = ids["item_id"] + jnp.where(
            oov[:, None], self.backoff(ad), 0).astype(self.dtype)
    parts = list(ids.values())
    if self.num_dense:
      parts.append(batch["dense"].astype(self.dtype))
    if self.use_image:
      parts.append(ad)
      if self.pooling is not None:
        rows = batch["behavior_images"]
        mask = batch["behavior_mask"]
        if "image_mask" in batch:  # a behaviour on a padding row is padding
          mask = mask & batch["image_mask"][rows]
        parts.append(self.pooling(ad, emb[rows], mask, ids.get("item_id")))
    return self.head(jnp.concatenate(parts, axis=-1))

  def __call__(self, batch: dict[str, jax.Array],
               id_embeddings: dict[str, jax.Array] | None = None,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    """Logits float32 [B]; the CNN runs once per row of batch['images'].

    dropout_rng: given in training only (CNN-F's fc dropout); without it
    the model is deterministic, as eval, export and serving need.
    """
    emb = None
    if self.use_image:
      emb = self.encode_images(batch["images"], batch["image_category"],
                               dropout_rng)
    return self.score(batch, emb, id_embeddings)


def build_model(model_config: ml_collections.ConfigDict,
                info: batch_lib.DataInfo, rngs: nnx.Rngs) -> CTRModel:
  """The model described by config.model for a dataset described by `info`."""
  return CTRModel(model_config, info, rngs=rngs)


def _key_name(entry: Any) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def param_label(path: tuple) -> str:
  """'embed' for ID-embedding tables (model.id_embed[feature]), else 'dense'.

  Accepts nnx paths (tuples of str/int) and jax tree paths (DictKey,
  GetAttrKey, ...), e.g. for optax.multi_transform with
  jax.tree_util.tree_map_with_path.
  """
  return "embed" if "id_embed" in [_key_name(p) for p in path] else "dense"


def is_encoder_param(path: tuple) -> bool:
  """True for parameters of the image encoder (CNN and category priors).

  With late_fusion the encoder gets no gradient; a trainer that wants it truly
  frozen should also exempt these from weight decay (optax.set_to_zero).
  """
  names = [_key_name(p) for p in path]
  return "encoder" in names and "id_embed" not in names
