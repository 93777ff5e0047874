"""The PyTorch twin of csctr's small CSCNN + DCN, for benchmarks/peer_pytorch.py.

Same layers, shapes, parameters and equations as csctr.model (small
backbone, cscnn attention, dcn head): conv3x3 -> ReLU -> channel gate (1) ->
spatial gate (2) [-> 2x2 max pool] per layer, global average pool, FC; ID
embeddings; DCN cross layers (3) beside an MLP. load_csctr_params copies a
csctr model's weights in, so the twin can be checked to give csctr's logits
(tests/test_peer_pytorch.py). Only this benchmark imports torch.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from csctr.data import batch as batch_lib
from csctr.model import embeddings

_MEAN = torch.tensor([0.485, 0.456, 0.406]) * 255.0
_STD = torch.tensor([0.229, 0.224, 0.225]) * 255.0


class Attention(nn.Module):
  """CSCNN eqs. (1)-(2): channel then spatial gate, category priors."""

  def __init__(self, c, size, num_categories, prior_dim, reduction, kernel):
    super().__init__()
    h = max(c // reduction, 1)
    self.mlp_hidden = nn.Linear(c + prior_dim, h)
    self.mlp_out = nn.Linear(h, c)
    self.channel_prior = nn.Parameter(torch.randn(num_categories, prior_dim))
    self.spatial = nn.Conv2d(3, 1, kernel, padding=(kernel - 1) // 2)
    self.spatial_prior = nn.Parameter(torch.randn(num_categories, size, size))

  def forward(self, x, cat):  # x [U, C, H, W]
    ac = self.channel_prior[cat]
    z = torch.stack([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))])  # [2, U, C]
    z = torch.cat([z, ac.expand(2, *ac.shape)], dim=-1)
    mc = torch.sigmoid(self.mlp_out(F.relu(self.mlp_hidden(z))).sum(0))
    x = x * mc[:, :, None, None]
    maps = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True),
                      self.spatial_prior[cat][:, None]], dim=1)
    return x * torch.sigmoid(self.spatial(maps))


class Model(nn.Module):

  def __init__(self, image_size, channels, vocab_sizes, num_dense,
               num_categories, embed_dim=16, visual_dim=32, prior_dim=8,
               reduction=4, kernel=7, cross_layers=3, mlp_dims=(256, 128)):
    super().__init__()
    self.convs, self.attns, self.pool = nn.ModuleList(), nn.ModuleList(), []
    size, c_in = image_size, 3
    for i, c in enumerate(channels):
      self.convs.append(nn.Conv2d(c_in, c, 3, padding=1))
      self.attns.append(Attention(c, size, num_categories, prior_dim,
                                  reduction, kernel))
      pool = i < len(channels) - 1 and size > 1
      self.pool.append(pool)
      size, c_in = (-(-size // 2) if pool else size), c
    self.fc = nn.Linear(c_in, visual_dim)
    self.embeds = nn.ModuleList(nn.Embedding(v, embed_dim) for v in vocab_sizes)
    d = len(vocab_sizes) * embed_dim + num_dense + visual_dim
    self.cross_kernel = nn.Parameter(torch.randn(cross_layers, d) * d**-0.5)
    self.cross_bias = nn.Parameter(torch.zeros(cross_layers, d))
    layers, prev = [], d
    for m in mlp_dims:
      layers += [nn.Linear(prev, m), nn.ReLU()]
      prev = m
    self.mlp = nn.Sequential(*layers)
    self.logit = nn.Linear(d + prev, 1)

  def encode(self, images, cat):
    x = ((images.float() - _MEAN) / _STD).permute(0, 3, 1, 2)
    for conv, attn, pool in zip(self.convs, self.attns, self.pool):
      x = attn(F.relu(conv(x)), cat)
      if pool:
        x = F.max_pool2d(x, 2, ceil_mode=True)
    return self.fc(x.mean(dim=(2, 3)))

  def forward(self, batch):
    emb = self.encode(batch["images"], batch["image_category"])
    parts = [e(batch["sparse"][:, i]) for i, e in enumerate(self.embeds)]
    if "dense" in batch:
      parts.append(batch["dense"])
    parts.append(emb[batch["ad_image"]])
    x0 = torch.cat(parts, dim=-1)
    x = x0
    for l in range(self.cross_kernel.shape[0]):
      x = x0 * (x @ self.cross_kernel[l])[:, None] + self.cross_bias[l] + x
    return self.logit(torch.cat([x, self.mlp(x0)], dim=-1))[:, 0]


def load_csctr_params(model: Model, params: dict, sparse_features) -> None:
  """Copies csctr's pure-dict params (to_pure_dict) into the torch twin."""
  t = lambda a: torch.from_numpy(np.asarray(a, np.float32).copy())
  bb = params["encoder"]["backbone"]
  with torch.no_grad():
    for i, (conv, attn) in enumerate(zip(model.convs, model.attns)):
      conv.weight.copy_(t(bb["convs"][i]["kernel"]).permute(3, 2, 0, 1))
      conv.bias.copy_(t(bb["convs"][i]["bias"]))
      a = bb["attns"][i]
      for name in ("mlp_hidden", "mlp_out"):
        getattr(attn, name).weight.copy_(t(a[name]["kernel"]).T)
        getattr(attn, name).bias.copy_(t(a[name]["bias"]))
      attn.channel_prior.copy_(t(a["channel_prior"]))
      attn.spatial_prior.copy_(t(a["spatial_prior"]))
      attn.spatial.weight.copy_(t(a["spatial_kernel"]).permute(3, 2, 0, 1))
      attn.spatial.bias.copy_(t(a["spatial_bias"]))
    model.fc.weight.copy_(t(bb["fc"]["kernel"]).T)
    model.fc.bias.copy_(t(bb["fc"]["bias"]))
    for emb, name in zip(model.embeds, sparse_features):
      emb.weight.copy_(t(params["id_embed"][name]["embedding"]))
    head = params["head"]
    model.cross_kernel.copy_(t(head["cross"]["kernel"]))
    model.cross_bias.copy_(t(head["cross"]["bias"]))
    linears = [m for m in model.mlp if isinstance(m, nn.Linear)]
    layers = head["mlp"]["layers"]  # a dict {0: ..., 1: ...} or a list
    for lin, p in zip(linears, [layers[i] for i in range(len(linears))]):
      lin.weight.copy_(t(p["kernel"]).T)
      lin.bias.copy_(t(p["bias"]))
    model.logit.weight.copy_(t(head["logit"]["kernel"]).T)
    model.logit.bias.copy_(t(head["logit"]["bias"]))


def to_torch_batch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
  """The fields the model and loss read, as tensors (indices as int64)."""
  out = {}
  for k in ("images", "image_category", "sparse", "ad_image", "dense",
            "label", "weight"):
    if k in batch and not (k == "dense" and batch[k].shape[-1] == 0):
      v = torch.from_numpy(np.ascontiguousarray(batch[k]))
      out[k] = v.long() if v.dtype == torch.int32 else v
  return out


def bce_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
  """csctr's bce_loss: weighted mean of sigmoid cross entropy."""
  w = batch["weight"]
  loss = F.binary_cross_entropy_with_logits(logits, batch["label"],
                                            reduction="none")
  total = w.sum()
  return (w * loss).sum() / torch.where(total > 0, total, torch.ones_like(total))


def build(config, info: batch_lib.DataInfo) -> Model:
  """The twin of csctr's model for config.model (small/cscnn/dcn only)."""
  m = config.model
  # csctr pads each ID table to a multiple of rows (never looked up): the
  # twin holds the same tables, so the parameter counts match.
  rows = [embeddings.padded_rows(v, m.table_row_multiple)
          for v in info.vocab_sizes]
  return Model(info.image_size, tuple(m.small_channels), rows,
               info.num_dense, info.num_categories, embed_dim=m.embed_dim,
               visual_dim=m.visual_dim, prior_dim=m.channel_prior_dim,
               reduction=m.reduction, kernel=m.spatial_kernel,
               cross_layers=m.cross_layers, mlp_dims=tuple(m.mlp_dims))


def step_runner(config, info, compiled: bool, seed: int = 0
                ) -> tuple[Callable[[int], float], int]:
  """(n -> seconds for n train steps, parameter count) for the torch twin.

  The same contract as benchmarks.step_timing.step_runner: Adam on every
  parameter (ID tables at config.optim.embed_lr, the rest at
  config.optim.lr), one dummy batch of config's shapes with every slot real.
  compiled: torch.compile the forward + loss (AOTAutograd compiles the
  backward with it) and the optimizer step.
  """
  torch.manual_seed(seed)
  model = build(config, info)
  embed = [p for e in model.embeds for p in e.parameters()]
  ids = {id(p) for p in embed}
  dense = [p for p in model.parameters() if id(p) not in ids]
  opt = torch.optim.Adam([{"params": dense, "lr": config.optim.lr},
                          {"params": embed, "lr": config.optim.embed_lr}])
  d = config.data
  batch = to_torch_batch(batch_lib.dummy_batch(
      info, d.groups_per_batch, d.group_size, d.unique_images, seed=seed))
  batch["weight"] = torch.ones_like(batch["weight"])

  def forward_loss():
    return bce_loss(model(batch), batch)

  opt_step = opt.step
  if compiled:
    forward_loss = torch.compile(forward_loss)
    opt_step = torch.compile(opt.step)

  def run(n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      opt.zero_grad(set_to_none=True)
      loss = forward_loss()
      loss.backward()
      opt_step()
    if not torch.isfinite(loss):
      raise FloatingPointError(f"non-finite torch loss {loss}")
    return time.perf_counter() - start

  return run, sum(p.numel() for p in model.parameters())
