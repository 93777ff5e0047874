"""Training losses over a padded batch: padding slots (weight 0) never count."""

import jax
import jax.numpy as jnp
import optax


def bce_loss(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
  """Sigmoid cross entropy averaged over real impressions (padding weighs 0)."""
  w = batch["weight"]
  loss = optax.sigmoid_binary_cross_entropy(logits, batch["label"])
  total = jnp.sum(w)
  return jnp.sum(w * loss) / jnp.where(total > 0, total, 1.0)


def bpr_loss(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
  """Pairwise BPR (Rendle et al.; the DVBPR/CSCNN Amazon protocol).

  Pairing: each real positive i is paired with every real negative j of the
  same user in the batch; a positive whose user has no negative in the batch
  is paired with all negatives of the batch (uniform in-batch negatives, as
  BPR's sampled negative items). loss_i = mean_j -log sigmoid(s_i - s_j);
  the batch loss is the weighted mean over positives that have a pair.
  """
  w = batch["weight"]
  real = w > 0
  pos = real & (batch["label"] > 0.5)
  neg = real & (batch["label"] <= 0.5)
  pair = pos[:, None] & neg[None, :]
  same_user = pair & (batch["user_id"][:, None] == batch["user_id"][None, :])
  pair = jnp.where(jnp.any(same_user, axis=1, keepdims=True), same_user, pair)
  pair_w = jnp.where(pair, w[None, :], 0.0)
  nll = -jax.nn.log_sigmoid(logits[:, None] - logits[None, :])
  per_pos = (jnp.sum(pair_w * nll, axis=1)
             / jnp.maximum(jnp.sum(pair_w, axis=1), 1e-9))
  pos_w = jnp.where(jnp.any(pair, axis=1), w, 0.0)
  total = jnp.sum(pos_w)
  return jnp.sum(pos_w * per_pos) / jnp.where(total > 0, total, 1.0)


LOSSES = {"bce": bce_loss, "bpr": bpr_loss}
