"""ID embedding engine: each step costs O(rows the batch touches), never O(table).

A CTR model's ID tables (`model.id_embed[feature].embedding`, [rows, d]) are
most of its parameters and almost all of them idle in any one step. The
train step (csctr/training/steps.py) therefore never differentiates a table:

  1. unique ids per feature, fixed size under jit
     (`jnp.unique(size=S, fill_value=rows)`: padding slots hold the
     out-of-range id `rows`, which gathers zeros and scatters nowhere);
  2. one gather of those S rows per table;
  3. the loss is differentiated with respect to the per-impression
     embeddings e[b] = rows[inverse[b]], and duplicates are merged by a
     segment sum over `inverse` -> one gradient per unique row;
  4. the embedding optimizer reads, updates and scatters back the touched
     rows of the table and of its slots (`RowOptimizer`).

Rows count as touched when a real impression (weight > 0) uses them, so
padding impressions move nothing, not even lazy Adam's moments. Under
data parallelism the only table-related traffic is the batch's ids and the
[S, d] row gradients; with tables row-sharded (csctr/training/mesh.py) XLA
partitions the gather and the scatter by rows: each shard serves the ids
in its range, and no table is ever all-gathered
(tests/test_embeddings_sharded.py scans the compiled step for that).

Optimizers (config.optim.embed_optimizer), all on the touched rows only:
  sgd              w -= lr g
  adagrad          a += g^2;            w -= lr g / sqrt(a + eps)
                   (optax.adagrad's formula, so both agree where rows move)
  rowwise_adagrad  a_r += mean_j g_rj^2 (one accumulator per row, as
                   TorchRec's RowWiseAdagrad; d times less slot memory);
                   w -= lr g / sqrt(a_r + eps)
  lazy_adam        Adam moments of touched rows only, bias-corrected with
                   the global step (TF's LazyAdam); equals optax.adam when
                   every row is touched every step.
  ftrl             FTRL-Proximal (McMahan et al., KDD 2013; TF's Ftrl with
                   learning_rate_power -0.5): n' = n + g^2,
                   z += g - (sqrt(n') - sqrt(n)) / lr * w,
                   w = 0 if |z| <= l1 else
                       -(z - sign(z) l1) / ((beta + sqrt(n')) / lr + 2 l2).
                   w is a function of z: as in TF, a row's initial value
                   is replaced at its first update (n starts at
                   initial_accumulator, z at 0); l1 > 0 zeroes rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

Slots = dict[str, jax.Array]

# Optimizer -> its slots, each shaped like the table or ([rows]) per row.
SLOTS = {"sgd": (), "adagrad": ("accumulator",),
         "rowwise_adagrad": ("accumulator",), "lazy_adam": ("m", "v"),
         "ftrl": ("z", "n")}
OPTIMIZERS = tuple(SLOTS)


class Lookup(NamedTuple):
  """One feature's rows for one batch.

  Attributes:
    ids: int32 [S] unique ids, ascending; padding slots hold `rows` (out of
      range).
    inverse: int32 [N] slot of each impression's id: ids[inverse] == input.
    touched: bool [S] slots used by at least one real impression.
    rows: float32 [S, d] the gathered table rows (zeros for padding slots).
  """

  ids: jax.Array
  inverse: jax.Array
  touched: jax.Array
  rows: jax.Array


def padded_rows(vocab_size: int, multiple: int) -> int:
  """Table rows for a vocabulary: rounded up so that shards split evenly.

  Rows past the vocabulary are never looked up; they only make every table
  divide over the devices it is sharded on (a table that does not divide
  would otherwise have to be replicated).
  """
  if multiple < 1:
    raise ValueError(f"model.table_row_multiple={multiple} must be >= 1")
  return -(-int(vocab_size) // multiple) * multiple


# nnx.Embed's initializer: N(0, 1/d) per entry, whatever the row count.
_EMBED_INIT = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal",
                                                   out_axis=0)
# Tables up to this many entries are drawn in one call, exactly as nnx.Embed
# draws them; larger ones row by row in a loop (table_init).
ONE_SHOT_ENTRIES = 1 << 24
CHUNK_ENTRIES = 1 << 22  # entries drawn per loop step, all groups together


def table_init(key: jax.Array, shape: tuple[int, int], dtype: Any = jnp.float32,
               *, groups: int = 1) -> jax.Array:
  """nnx.Embed's N(0, 1/d) table init, with bounded memory for huge tables.

  One call draws a [rows, d] table through threefry bits, uniforms and
  erfinv, which XLA on CPU keeps as ~3 table-sized temporaries: 10^8 x 16
  rows (6.4 GB) needed ~25 GB. Up to ONE_SHOT_ENTRIES entries the table is
  drawn as nnx.Embed draws it (same values as ever); above, row r is drawn
  from fold_in(key, r), so its values depend on the seed and r only (not on
  the device count or the chunking), and a loop fills CHUNK_ENTRIES entries
  per step into the table viewed as [groups, rows / groups, d]. `groups`
  (model.table_row_multiple, which always divides the padded rows) is the
  dim that row sharding splits: every device fills its own rows in place,
  with no full-table temporary nor any table on one device.
  """
  rows, dim = shape
  if rows * dim <= ONE_SHOT_ENTRIES:
    return _EMBED_INIT(key, shape, dtype)
  groups = groups if groups >= 1 and rows % groups == 0 else 1
  per = rows // groups
  chunk = max(1, min(per, CHUNK_ENTRIES // (groups * dim)))
  draw_row = lambda r: _EMBED_INIT(jax.random.fold_in(key, r), (1, dim),
                                   dtype)[0]

  def fill(i, table):
    start = jnp.minimum(i * chunk, per - chunk)  # the last chunk overlaps
    ids = (jnp.arange(groups, dtype=jnp.uint32)[:, None] * per
           + start.astype(jnp.uint32) + jnp.arange(chunk, dtype=jnp.uint32))
    block = jax.vmap(jax.vmap(draw_row))(ids)  # [groups, chunk, d]
    return jax.lax.dynamic_update_slice(table, block, (0, start, 0))

  # The loop overwrites every row of its carry, in place. A constant start
  # (zeros) would be shared by tables of one shape, built once and copied:
  # a table-sized temporary. A value of this table's key keeps it its own.
  first = jax.random.key_data(key).ravel()[0].astype(dtype)
  table = jax.lax.fori_loop(0, -(-per // chunk), fill,
                            jnp.broadcast_to(first, (groups, per, dim)))
  return table.reshape(rows, dim)


def lookup(table: jax.Array, ids: jax.Array, weight: jax.Array,
           size: int | None = None) -> Lookup:
  """The unique rows of `table` that `ids` ([N] int32) touch, gathered once.

  Args:
    table: [rows, d].
    ids: [N] row ids, each in [0, rows).
    weight: [N] impression weights; rows used only by weight-0 (padding)
      impressions are not `touched`.
    size: slots S (default N: enough for N distinct ids).
  """
  num_rows = table.shape[0]
  size = ids.shape[0] if size is None else size
  uniq, inverse = jnp.unique(ids, size=size, fill_value=num_rows,
                             return_inverse=True)
  inverse = inverse.reshape(ids.shape)
  touched = jax.ops.segment_max((weight > 0).astype(jnp.int32), inverse,
                                num_segments=size) > 0
  rows = jnp.take(table, uniq, axis=0, mode="fill", fill_value=0)
  return Lookup(uniq, inverse, touched & (uniq < num_rows), rows)


def row_gradients(per_impression: jax.Array, found: Lookup) -> jax.Array:
  """[N, d] gradients of the per-impression embeddings -> [S, d] row grads.

  Duplicate ids are merged by a segment sum; untouched slots get zero.
  """
  g = jax.ops.segment_sum(per_impression, found.inverse,
                          num_segments=found.ids.shape[0])
  return jnp.where(found.touched[:, None], g, 0)


def sum_of_squares(row_grads: dict[str, jax.Array]) -> jax.Array:
  """Squared L2 norm of the touched rows' gradients (for clipping, logging)."""
  return sum((jnp.sum(jnp.square(g)) for g in row_grads.values()),
             jnp.zeros((), jnp.float32))


@dataclasses.dataclass(frozen=True)
class RowOptimizer:
  """A sparse optimizer: slots shaped like the table (or one value per row).

  Attributes:
    kind: one of OPTIMIZERS.
    lr: step size.
    initial_accumulator: Adagrad accumulators' start (optax's default 0.1).
    eps: added under the square root (Adagrad) or to the denominator (Adam).
    b1, b2: Adam's moment decays.
    l1, l2, beta: FTRL's regularisation strengths and its beta.
  """

  kind: str
  lr: float
  initial_accumulator: float = 0.1
  eps: float = 1e-7
  b1: float = 0.9
  b2: float = 0.999
  l1: float = 0.0
  l2: float = 0.0
  beta: float = 0.0

  def __post_init__(self):
    if self.kind not in SLOTS:
      raise ValueError(f"optim.embed_optimizer={self.kind!r} not in "
                       f"{OPTIMIZERS}")

  @classmethod
  def from_config(cls, optim: ml_collections.ConfigDict) -> "RowOptimizer":
    """From config.optim (embed_optimizer, embed_lr, embed_*)."""
    return cls(kind=optim.embed_optimizer, lr=optim.embed_lr,
               initial_accumulator=optim.embed_initial_accumulator,
               eps=optim.embed_eps, b1=optim.embed_b1, b2=optim.embed_b2,
               # .get: configs saved before FTRL existed.
               l1=optim.get("embed_l1", 0.0), l2=optim.get("embed_l2", 0.0),
               beta=optim.get("embed_beta", 0.0))

  def init(self, table: jax.Array) -> Slots:
    """Zero-cost slots for one table ({} for SGD)."""
    rows = table.shape[0]
    if self.kind == "adagrad":
      return {"accumulator": jnp.full(table.shape, self.initial_accumulator,
                                      jnp.float32)}
    if self.kind == "rowwise_adagrad":
      return {"accumulator": jnp.full((rows,), self.initial_accumulator,
                                      jnp.float32)}
    if self.kind == "lazy_adam":
      return {"m": jnp.zeros(table.shape, jnp.float32),
              "v": jnp.zeros(table.shape, jnp.float32)}
    if self.kind == "ftrl":
      return {"z": jnp.zeros(table.shape, jnp.float32),
              "n": jnp.full(table.shape, self.initial_accumulator,
                            jnp.float32)}
    return {}

  def update_rows(self, rows: jax.Array, grads: jax.Array, slots: Slots,
                  count: jax.Array) -> tuple[jax.Array, Slots]:
    """New values of gathered rows [S, d] and their slots; count = t >= 1."""
    if self.kind == "sgd":
      return rows - self.lr * grads, slots
    if self.kind in ("adagrad", "rowwise_adagrad"):
      sq = jnp.square(grads)
      if self.kind == "rowwise_adagrad":
        sq = jnp.mean(sq, axis=-1)
      acc = slots["accumulator"] + sq
      scale = jax.lax.rsqrt(acc + self.eps)
      if self.kind == "rowwise_adagrad":
        scale = scale[:, None]
      return rows - self.lr * grads * scale, {"accumulator": acc}
    if self.kind == "ftrl":
      return self._ftrl(rows, grads, slots)
    m = self.b1 * slots["m"] + (1 - self.b1) * grads
    v = self.b2 * slots["v"] + (1 - self.b2) * jnp.square(grads)
    t = count.astype(jnp.float32)
    m_hat = m / (1 - self.b1 ** t)
    v_hat = v / (1 - self.b2 ** t)
    return rows - self.lr * m_hat / (jnp.sqrt(v_hat) + self.eps), {"m": m,
                                                                     "v": v}

  def _ftrl(self, rows: jax.Array, grads: jax.Array,
            slots: Slots) -> tuple[jax.Array, Slots]:
    n = slots["n"] + jnp.square(grads)
    sigma = (jnp.sqrt(n) - jnp.sqrt(slots["n"])) / self.lr
    z = slots["z"] + grads - sigma * rows
    quadratic = (self.beta + jnp.sqrt(n)) / self.lr + 2 * self.l2
    w = jnp.where(jnp.abs(z) <= self.l1, 0.0,
                  -(z - jnp.sign(z) * self.l1) / quadratic)
    return w, {"z": z, "n": n}

  def apply(self, table: jax.Array, slots: Slots, found: Lookup,
            grads: jax.Array, count: jax.Array) -> tuple[jax.Array, Slots]:
    """Updates the touched rows of `table` and its slots in place.

    Only the S slots are read and written: untouched rows (and the padding
    slots, whose out-of-range id scatters nowhere) keep their values.
    """
    ids = found.ids
    keep = found.touched
    old = {k: s.at[ids].get(mode="fill", fill_value=0)
           for k, s in slots.items()}
    new_rows, new = self.update_rows(found.rows, grads, old, count)
    # An untouched slot is written back unchanged (or dropped when padding).
    new_rows = jnp.where(keep[:, None], new_rows, found.rows)
    table = table.at[ids].set(new_rows, mode="drop")
    out = {}
    for k, s in slots.items():
      mask = keep if new[k].ndim == 1 else keep[:, None]
      out[k] = s.at[ids].set(jnp.where(mask, new[k], old[k]), mode="drop")
    return table, out


def clip_scale(norm: jax.Array, clip_norm: float) -> jax.Array:
  """optax.clip_by_global_norm's factor: 1 under clip_norm, else clip/norm."""
  if not clip_norm or clip_norm <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.where(norm < clip_norm, 1.0, clip_norm / norm)


def drop_ids(sparse: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """ID dropout: each id becomes the OOV row 0 with probability `rate`.

  So the OOV row, which serves every id unseen in training (cold items), is
  trained on a sample of real traffic rather than only on rare ids.
  """
  if rate <= 0:
    return sparse
  drop = jax.random.bernoulli(key, rate, sparse.shape)
  return jnp.where(drop, 0, sparse)


def tree_tables(tables: Any) -> tuple[list[str], list[jax.Array], Any]:
  """(feature names, table arrays, treedef) of a state holding only tables.

  The feature is the path entry after 'id_embed'
  (model.id_embed[feature].embedding).
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tables)
  names = []
  for path, _ in leaves:
    keys = [getattr(k, "key", getattr(k, "name", k)) for k in path]
    names.append(str(keys[keys.index("id_embed") + 1]))
  return names, [x for _, x in leaves], treedef


def init_slots(opt: RowOptimizer, tables: Any) -> dict[str, Any]:
  """{slot: a tree like `tables`}: each slot's path ends with its table's.

  So the sharding table places every slot like its table
  (csctr/training/mesh.py), as it does optax's slots.
  """
  _, arrays, treedef = tree_tables(tables)
  per_table = [opt.init(a) for a in arrays]
  return {k: jax.tree_util.tree_unflatten(treedef, [s[k] for s in per_table])
          for k in SLOTS[opt.kind]}


def lookup_tables(tables: Any, sparse: jax.Array, weight: jax.Array,
                  features: tuple[str, ...]) -> dict[str, Lookup]:
  """{feature: Lookup} for the batch's ids ([B, F], column order `features`)."""
  names, arrays, _ = tree_tables(tables)
  return {n: lookup(t, sparse[:, features.index(n)], weight)
          for n, t in zip(names, arrays)}


def update_tables(opt: RowOptimizer, tables: Any, slots: dict[str, Any],
                  found: dict[str, Lookup], grads: dict[str, jax.Array],
                  count: jax.Array) -> tuple[Any, dict[str, Any]]:
  """`opt` applied to every table's touched rows; same trees back."""
  names, arrays, treedef = tree_tables(tables)
  flat = {k: jax.tree_util.tree_leaves(v) for k, v in slots.items()}
  new_tables, new_slots = [], {k: [] for k in slots}
  for i, (name, table) in enumerate(zip(names, arrays)):
    table, s = opt.apply(table, {k: v[i] for k, v in flat.items()},
                         found[name], grads[name], count)
    new_tables.append(table)
    for k in slots:
      new_slots[k].append(s[k])
  return (jax.tree_util.tree_unflatten(treedef, new_tables),
          {k: jax.tree_util.tree_unflatten(treedef, v)
           for k, v in new_slots.items()})
