r"""The papers' ablations, run and tabulated: does csctr reproduce the claims?

  # CPU (2 cores, ~20 min): default configs, fixed data, small DICM.
  python benchmarks/ablations.py --mode=quick
  # Accelerator: longer runs, bigger data, data seeds vary too.
  python benchmarks/ablations.py --mode=full --out_dir=/tmp/ablations_full

Grid: {no_image, late_fusion_random, late_fusion, none, se, cbam,
cscnn_channel, cscnn_spatial, cscnn} x {synthetic, fashion_mnist} x seeds,
plus the DICM behaviour poolings {none, sum, max, attentive, multi_query} on
synthetic data with behaviour lists. Every run is one
`train.train_and_evaluate` in this process; its final test eval is kept.

Writes to --out_dir (default docs/):
  ablations.json  every run (record, wall time, exact config overrides), the
                  settings, and the aggregated table; rewritten after each
                  run, so a killed grid resumes from it (finished runs are not
                  redone; a run cut short resumes from its own checkpoint).
  results.md      mean +- std over seeds of AUC, GAUC, cold AUC, logloss,
                  Bayes AUC beside them, and the paired comparisons behind
                  each paper claim.
  ablations.png   bar chart of AUC and cold AUC.

Seeds: seed s sets config.seed (model init) and config.data.shuffle_seed
(batch order). In full mode it also sets the data seed
(config.synthetic.seed / config.fashion_mnist.seed), so each seed is a new
simulated dataset; quick mode keeps one dataset (one prepare, and the three
seeds of a cell share one compiled program through JAX's persistent cache),
so its std measures training noise only.

Late fusion, two stand-ins for the papers' frozen off-the-shelf CNN:
  late_fusion         the encoder of this seed's `none` run (attention=none,
                      trained end to end on the same train split for the same
                      steps, so it never saw a category), loaded through
                      config.model.encoder_init and frozen; a fresh CTR model
                      is trained on its features. Favourable to late fusion:
                      the features were learnt from these very clicks.
  late_fusion_random  a frozen randomly initialised CNN: the floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np

from csctr import configlib  # pylint: disable=g-import-not-at-top
from csctr import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

METRICS = ("auc", "gauc", "cold_auc", "logloss")
DATASETS = ("synthetic", "fashion_mnist")
# Grid rows, weakest first. Values are config.model overrides; encoder_init
# is filled in by the runner (the workdir of the same seed's `none` run).
VARIANTS: dict[str, dict[str, Any]] = {
    "no_image": {"use_image": False},
    "late_fusion_random": {"attention": "none", "late_fusion": True},
    "late_fusion": {"attention": "none", "late_fusion": True,
                    "encoder_init": "none"},
    "none": {"attention": "none"},
    "se": {"attention": "se"},
    "cbam": {"attention": "cbam"},
    "cscnn_channel": {"attention": "cscnn_channel"},
    "cscnn_spatial": {"attention": "cscnn_spatial"},
    "cscnn": {"attention": "cscnn"},
}
DICM_VARIANTS: dict[str, dict[str, Any]] = {
    f"dicm_{p}": {"attention": "cscnn", "behavior_pooling": p}
    for p in ("none", "sum", "max", "attentive", "multi_query")}

# The papers' claims as (name, better variant, worse variant[, metric]):
# Δ = metric(better) − metric(worse) on runs of the same seed. Without a
# metric, both AUC and cold AUC are compared; "cold_gap" is cold AUC − AUC,
# so its Δ is how much more the better model gains on cold items.
CLAIMS: tuple[tuple[str, ...], ...] = (
    ("category-specific attention beats a plain CNN", "cscnn", "none"),
    ("category-specific attention beats CBAM", "cscnn", "cbam"),
    ("category-specific attention beats SE", "cscnn", "se"),
    ("CBAM beats a plain CNN", "cbam", "none"),
    ("SE beats a plain CNN", "se", "none"),
    ("channel prior alone helps (vs CBAM)", "cscnn_channel", "cbam"),
    ("spatial prior alone helps (vs CBAM)", "cscnn_spatial", "cbam"),
    ("end to end beats late fusion (pretrained CNN)", "cscnn", "late_fusion"),
    ("end to end beats late fusion (random CNN)", "cscnn",
     "late_fusion_random"),
    ("images help (CSCNN vs no image)", "cscnn", "no_image"),
    ("images help cold items more (Δ of cold AUC − AUC)", "cscnn",
     "no_image", "cold_gap"),
    ("behaviour images add on top (sum)", "dicm_sum", "dicm_none"),
    ("behaviour images add on top (max)", "dicm_max", "dicm_none"),
    ("behaviour images add on top (attentive)", "dicm_attentive", "dicm_none"),
    ("behaviour images add on top (multi-query)", "dicm_multi_query",
     "dicm_none"),
)


@dataclasses.dataclass(frozen=True)
class Mode:
  """Everything a grid mode changes, recorded verbatim in the output.

  Attributes:
    name: 'quick' | 'full' | 'smoke'.
    seeds: number of seeds per cell.
    dicm_seeds: seeds of the DICM cells.
    vary_data_seed: whether seed s also re-draws the simulated dataset.
    overrides: dotted config overrides for every grid cell.
    dicm_overrides: dotted overrides for the DICM cells (on configs/dicm.py).
    base: config module per dataset (tiny for the smoke test).
  """

  name: str
  seeds: int
  dicm_seeds: int
  vary_data_seed: bool
  overrides: dict[str, Any]
  dicm_overrides: dict[str, Any]
  base: dict[str, str] = dataclasses.field(default_factory=lambda: {
      "synthetic": "default", "fashion_mnist": "fashion_mnist",
      "dicm": "dicm"})


_ONE_EVAL = {"eval_every": 0, "checkpoint_every": 0, "keep_checkpoints": 1}

MODES = {
    # 2 shared CPU cores, ~20 min: the default configs unchanged (200k
    # impressions, 4000 items, 32 px, 2000 steps of 200 impressions, i.e.
    # 2.5 epochs), evaluated once at the end. DICM: 16 px images and 1000
    # items (behaviour references concentrate on fewer images, so fewer
    # overflow the unique-image budget: ~37% dropped at U=64), L=3, 1000
    # steps.
    "quick": Mode(
        "quick", seeds=3, dicm_seeds=3, vary_data_seed=False,
        overrides={"num_train_steps": 2000, "log_every": 500, **_ONE_EVAL},
        dicm_overrides={"num_train_steps": 1000, "log_every": 500,
                        "data.image_size": 16, "synthetic.num_items": 1000,
                        "data.num_behaviors": 3, "data.unique_images": 64,
                        "data.eval_unique_images": 256, **_ONE_EVAL}),
    # An accelerator: 5x the data (10^6 impressions, 10^4 items and users),
    # 8x the batch (64 groups of 25), 10^4 steps (2 epochs); a new dataset
    # per seed; DICM as configs/dicm.py (L=5, U=128) on the same data size.
    # Not yet run by the project: a starting point.
    "full": Mode(
        "full", seeds=3, dicm_seeds=3, vary_data_seed=True,
        overrides={"num_train_steps": 10_000, "log_every": 500,
                   "eval_every": 5_000, "checkpoint_every": 2_500,
                   "data.groups_per_batch": 64, "data.unique_images": 64,
                   "data.eval_groups_per_batch": 256,
                   "data.eval_unique_images": 256,
                   "synthetic.num_impressions": 1_000_000,
                   "synthetic.num_items": 10_000,
                   "synthetic.num_users": 10_000,
                   "fashion_mnist.num_impressions": 1_000_000,
                   "fashion_mnist.num_items": 10_000,
                   "fashion_mnist.num_users": 10_000},
        dicm_overrides={"num_train_steps": 10_000, "log_every": 500,
                        "eval_every": 5_000, "checkpoint_every": 2_500,
                        "synthetic.num_impressions": 1_000_000,
                        "synthetic.num_items": 10_000,
                        "synthetic.num_users": 10_000}),
}


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of the grid."""

  dataset: str  # synthetic | fashion_mnist | dicm (synthetic + behaviours)
  variant: str
  seed: int

  @property
  def key(self) -> str:
    return f"{self.dataset}/{self.variant}/seed{self.seed}"


def grid(mode: Mode, datasets: Sequence[str] = DATASETS,
         variants: Sequence[str] | None = None, dicm: bool = True
         ) -> list[Cell]:
  """The cells in run order: `none` precedes `late_fusion` of its seed."""
  variants = list(VARIANTS) if variants is None else list(variants)
  run_order = ["none"] + [v for v in VARIANTS if v != "none"]
  cells = [Cell(d, v, s) for d in datasets for s in range(mode.seeds)
           for v in run_order if v in variants]
  if dicm:
    cells += [Cell("dicm", v, s) for s in range(mode.dicm_seeds)
              for v in DICM_VARIANTS]
  return cells


def cell_overrides(cell: Cell, mode: Mode) -> dict[str, Any]:
  """The dotted config overrides of one cell (recorded beside its result)."""
  out = dict(mode.dicm_overrides if cell.dataset == "dicm" else mode.overrides)
  model = (DICM_VARIANTS if cell.dataset == "dicm" else VARIANTS)[cell.variant]
  out.update({f"model.{k}": v for k, v in model.items()})
  out["seed"] = cell.seed
  out["data.shuffle_seed"] = cell.seed
  if mode.vary_data_seed:
    source = "fashion_mnist" if cell.dataset == "fashion_mnist" else "synthetic"
    out[f"{source}.seed"] = cell.seed
  return out


def make_config(cell: Cell, mode: Mode, data_dir: str = ""
                ) -> ml_collections.ConfigDict:
  """The cell's config: its benchmark's config file plus cell_overrides.

  encoder_init is left as the variant name 'none'; run_grid resolves it to
  the workdir of the same seed's `none` run.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  base = importlib.import_module(f"configs.{mode.base[cell.dataset]}")
  config = base.get_config()
  if cell.dataset == "fashion_mnist":
    config.dataset = "fashion_mnist"  # also when the base is tiny (tests)
  if data_dir:
    config.data_dir = data_dir
  for key, value in cell_overrides(cell, mode).items():
    configlib.set_path(config, key, value)
  return config


def settings_hash(cell: Cell, mode: Mode) -> str:
  """Names a run's workdir: a settings change never resumes a stale run."""
  blob = json.dumps({"mode": mode.name, "base": mode.base[cell.dataset],
                     **cell_overrides(cell, mode)}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:8]


def workdir_of(root: str, cell: Cell, mode: Mode) -> str:
  return os.path.join(root, cell.dataset, cell.variant,
                      f"seed{cell.seed}-{settings_hash(cell, mode)}")


# ---------------------------------------------------------------- aggregation


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
  """Mean, sample std (ddof=1; NaN for one value) and count of finite values."""
  v = np.array([x for x in values if x is not None and np.isfinite(x)],
               np.float64)
  if v.size == 0:
    return float("nan"), float("nan"), 0
  std = float(v.std(ddof=1)) if v.size > 1 else float("nan")
  return float(v.mean()), std, int(v.size)


def summarize(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (dataset, variant): mean/std/n of every metric over seeds."""
  groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for run in runs.values():
    groups.setdefault((run["dataset"], run["variant"]), []).append(run)
  order = {v: i for i, v in enumerate(list(VARIANTS) + list(DICM_VARIANTS))}
  rows = []
  for (dataset, variant), members in sorted(
      groups.items(), key=lambda kv: (
          (list(DATASETS) + ["dicm"]).index(kv[0][0])
          if kv[0][0] in list(DATASETS) + ["dicm"] else 99,
          order.get(kv[0][1], 99), kv[0][1])):
    row = {"dataset": dataset, "variant": variant,
           "seeds": sorted(m["seed"] for m in members),
           "wall_s": round(sum(m["wall_s"] for m in members), 1)}
    for metric in METRICS + ("bayes_auc", "bayes_auc_cold"):
      mean, std, n = mean_std(m["record"].get(metric) for m in members)
      row[metric] = {"mean": mean, "std": std, "n": n}
    rows.append(row)
  return rows


def paired_difference(runs: dict[str, dict[str, Any]], dataset: str,
                      better: str, worse: str, metric: str
                      ) -> tuple[float, float, int]:
  """Mean and std over seeds of metric(better) - metric(worse), same seed.

  Pairing by seed removes what the two runs share (data, batch order), so it
  resolves smaller differences than comparing the two means.
  """
  by_seed: dict[str, dict[int, float]] = {better: {}, worse: {}}
  for run in runs.values():
    if run["dataset"] == dataset and run["variant"] in by_seed:
      record = run["record"]
      if metric == "cold_gap":
        cold, auc = record.get("cold_auc"), record.get("auc")
        value = None if cold is None or auc is None else cold - auc
      else:
        value = record.get(metric)
      if value is not None and np.isfinite(value):
        by_seed[run["variant"]][run["seed"]] = value
  seeds = sorted(set(by_seed[better]) & set(by_seed[worse]))
  return mean_std(by_seed[better][s] - by_seed[worse][s] for s in seeds)


# Two-sided 95% quantiles of Student's t by degrees of freedom (no scipy).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447,
         7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086,
         30: 2.042}


def t_critical(df: int) -> float:
  """t_{0.975, df}, rounded to the next tabulated df below (conservative)."""
  if df >= 60:
    return 2.0
  return _T975[max(k for k in _T975 if k <= df)]


def verdict(mean: float, std: float, n: int) -> str:
  """A paired t-test at the 5% level (two-sided) on the per-seed gaps.

  'holds' / 'reversed' when |mean| > t_{0.975, n-1} * std / sqrt(n), 'within
  noise' otherwise. With three seeds t = 4.30: a gap must be large and
  steady to count. With n = 1 (no spread known) only the sign is given,
  as 'holds?' / 'reversed?'.
  """
  if n == 0 or not np.isfinite(mean):
    return "not run"
  if n == 1 or not np.isfinite(std):
    return "holds?" if mean > 0 else "reversed?"
  margin = t_critical(n - 1) * std / math.sqrt(n)
  if mean > margin:
    return "holds"
  if mean < -margin:
    return "reversed"
  return "within noise"


def claims_table(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
  rows = []
  for name, better, worse, *metric in CLAIMS:
    datasets = ("dicm",) if better.startswith("dicm") else DATASETS
    metrics = metric or ["auc", "cold_auc"]
    for dataset in datasets:
      entry = {"claim": name, "dataset": dataset, "better": better,
               "worse": worse, "metrics": metrics}
      for m in metrics:
        mean, std, n = paired_difference(runs, dataset, better, worse, m)
        entry[m] = {"mean": mean, "std": std, "n": n,
                    "verdict": verdict(mean, std, n)}
      if entry[metrics[0]]["n"]:
        rows.append(entry)
  return rows


# ---------------------------------------------------------------- writing


def _fmt(stat: dict[str, Any], digits: int = 4, signed: bool = False) -> str:
  """'mean ± std' ('-' when missing; the mean alone for one seed)."""
  mean, std = stat["mean"], stat["std"]
  if not np.isfinite(mean):
    return "-"
  text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
  if not np.isfinite(std):
    return text
  return f"{text} ± {std:.{digits}f}"


def _fmt_ceiling(row: dict[str, Any]) -> str:
  """Bayes AUC (cold items' Bayes AUC): fixed data has no spread to show."""
  out = _fmt(dict(row["bayes_auc"], std=float("nan")))
  cold = row.get("bayes_auc_cold", {"mean": float("nan")})
  if np.isfinite(cold["mean"]):
    out += f" ({cold['mean']:.4f})"
  return out


def _from_json(obj: Any) -> Any:
  """None (strict JSON's NaN) back to NaN inside metric stats."""
  if isinstance(obj, dict):
    return {k: (float("nan") if v is None and k in ("mean", "std") else
                _from_json(v)) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_from_json(v) for v in obj]
  return obj


def markdown(result: dict[str, Any]) -> str:
  """The results page: settings, command, wall time, tables, claims."""
  rows, mode = result["summary"], result["mode"]
  lines = [
      "# Ablation results",
      "",
      f"Generated by `{result['command']}` "
      f"(mode `{mode['name']}`; {len(result['runs'])} runs; "
      f"{result['run_wall_s'] / 60:.1f} min of run wall time on "
      f"{result['machine']}).",
      "",
      "Mean ± sample std over seeds of the final test eval; the Bayes AUC "
      "(the true CTR's AUC on the same test split; in brackets on its cold "
      "items) is the ceiling. "
      f"Seeds: {mode['seeds']} per cell ({mode['dicm_seeds']} for DICM); "
      + ("each seed also re-draws the simulated data."
         if mode["vary_data_seed"] else
         "one dataset per benchmark, seeds vary model init and batch order "
         "(the std is training noise, not data noise)."),
      "",
  ]
  titles = {"synthetic": "Synthetic (default config)",
            "fashion_mnist": "Fashion-MNIST (configs/fashion_mnist.py)",
            "dicm": "DICM behaviour images (synthetic with behaviour lists)"}
  for dataset in ("synthetic", "fashion_mnist", "dicm"):
    sub = [r for r in rows if r["dataset"] == dataset]
    if not sub:
      continue
    lines += [f"## {titles[dataset]}", "",
              "| model | AUC | GAUC | cold AUC | logloss | Bayes AUC "
              "(cold) | seeds |",
              "|---|---|---|---|---|---|---|"]
    for r in sub:
      lines.append(
          f"| {r['variant']} | {_fmt(r['auc'])} | {_fmt(r['gauc'])} | "
          f"{_fmt(r['cold_auc'])} | {_fmt(r['logloss'])} | "
          f"{_fmt_ceiling(r)} | {len(r['seeds'])} |")
    lines.append("")
  claims = result.get("claims") or []
  if claims:
    lines += ["## The papers' claims, as paired differences", "",
              "Δ = better − worse on runs of the same seed, mean ± std over "
              "seeds. Verdict: a paired t-test at the 5% level (two-sided; "
              "with 3 seeds |mean Δ| must exceed 2.48 std); "
              "'?': one seed, sign only.", "",
              "| claim | data | Δ AUC | verdict | Δ cold AUC | verdict |",
              "|---|---|---|---|---|---|"]
    for c in claims:
      cells = []
      for m in ("auc", "cold_auc"):
        if m in c:
          cells += [_fmt(c[m], signed=True), c[m]["verdict"]]
        elif m == "cold_auc" and "cold_gap" in c:
          cells += [_fmt(c["cold_gap"], signed=True), c["cold_gap"]["verdict"]]
        else:
          cells += ["", ""]
      lines.append(f"| {c['claim']} | {c['dataset']} | " + " | ".join(cells)
                   + " |")
    lines.append("")
  lines += ["## Settings", "", "Every cell (dotted config overrides):", "",
            "```", json.dumps(mode["overrides"], sort_keys=True), "```", "",
            "DICM cells (on configs/dicm.py):", "", "```",
            json.dumps(mode["dicm_overrides"], sort_keys=True), "```", ""]
  if result.get("figure"):
    lines += [f"![AUC and cold AUC per model]({result['figure']})", ""]
  return "\n".join(lines)


README_BEGIN = "<!-- ablations table: generated by benchmarks/ablations.py -->"
README_END = "<!-- end of ablations table -->"


def readme_table(rows: list[dict[str, Any]]) -> str:
  """The README's compact table: AUC and cold AUC per variant and dataset."""
  datasets = [d for d in ("synthetic", "fashion_mnist")
              if any(r["dataset"] == d for r in rows)]
  by_key = {(r["dataset"], r["variant"]): r for r in rows}
  variants = [v for v in VARIANTS if any((d, v) in by_key for d in datasets)]
  head = "| model | " + " | ".join(
      f"{d} AUC | {d} cold AUC" for d in datasets) + " |"
  lines = [head, "|---" * (1 + 2 * len(datasets)) + "|"]
  empty = {"mean": float("nan"), "std": float("nan")}
  for v in variants + ["bayes"]:
    cells = []
    for d in datasets:
      if v == "bayes":
        ref = next(r for r in rows if r["dataset"] == d)
        cold = ref.get("bayes_auc_cold", empty)
        cells += [_fmt(dict(ref["bayes_auc"], std=float("nan")), 3),
                  _fmt(dict(cold, std=float("nan")), 3)]
      else:
        r = by_key.get((d, v), {})
        cells += [_fmt(r.get("auc", empty), 3), _fmt(r.get("cold_auc", empty), 3)]
    lines.append(f"| {'Bayes-optimal' if v == 'bayes' else v} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def update_readme(path: str, table: str) -> bool:
  """Replaces the text between the README's markers; False if they are absent."""
  with open(path) as f:
    text = f.read()
  if README_BEGIN not in text or README_END not in text:
    return False
  head, rest = text.split(README_BEGIN, 1)
  _, tail = rest.split(README_END, 1)
  with open(path, "w") as f:
    f.write(f"{head}{README_BEGIN}\n{table}\n{README_END}{tail}")
  return True


def plot(rows: list[dict[str, Any]], path: str) -> None:
  """Bars of AUC and cold AUC (± std) per model, one panel per benchmark."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  datasets = [d for d in ("synthetic", "fashion_mnist", "dicm")
              if any(r["dataset"] == d for r in rows)]
  fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4),
                           squeeze=False)
  for ax, dataset in zip(axes[0], datasets):
    sub = [r for r in rows if r["dataset"] == dataset]
    x = np.arange(len(sub))
    for offset, metric, label in ((-0.2, "auc", "AUC"),
                                  (0.2, "cold_auc", "cold AUC")):
      mean = [r[metric]["mean"] for r in sub]
      std = [r[metric]["std"] if np.isfinite(r[metric]["std"]) else 0
             for r in sub]
      ax.bar(x + offset, mean, 0.4, yerr=std, capsize=2, label=label)
    bayes = [r["bayes_auc"]["mean"] for r in sub
             if np.isfinite(r["bayes_auc"]["mean"])]
    if bayes:
      ax.axhline(float(np.mean(bayes)), color="k", ls="--", lw=1,
                 label="Bayes AUC")
    ax.set_xticks(x, [r["variant"].removeprefix("dicm_") for r in sub],
                  rotation=45, ha="right", fontsize=8)
    values = [r[m]["mean"] for r in sub for m in ("auc", "cold_auc")
              if np.isfinite(r[m]["mean"])]
    ax.set_ylim(max(0.0, min(values) - 0.05),
                min(1.0, max(values + bayes) + 0.03))
    ax.set_title(dataset)
    ax.grid(axis="y", alpha=0.3)
  axes[0][0].set_ylabel("test AUC")
  axes[0][0].legend(fontsize=8, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_outputs(result: dict[str, Any], out_dir: str,
                  figure: bool = True, readme: str = "") -> None:
  """Aggregates result['runs'] and (re)writes JSON, Markdown and the chart.

  With `readme`, also the table between that file's README_BEGIN/END markers,
  so the README's numbers always come from this run's JSON.
  """
  os.makedirs(out_dir, exist_ok=True)
  result["summary"] = summarize(result["runs"])
  result["claims"] = claims_table(result["runs"])
  if figure and result["summary"]:
    plot(result["summary"], os.path.join(out_dir, "ablations.png"))
    result["figure"] = "ablations.png"
  tmp = os.path.join(out_dir, "ablations.json.tmp")
  with open(tmp, "w") as f:
    json.dump(metrics_lib.json_safe(result), f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(out_dir, "ablations.json"))
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(markdown(result))
  if readme and result["summary"]:
    update_readme(readme, readme_table(result["summary"]))


def load_previous(out_dir: str, mode: Mode) -> dict[str, dict[str, Any]]:
  """Finished runs of an earlier (killed) invocation with the same settings."""
  path = os.path.join(out_dir, "ablations.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    old = json.load(f)
  runs = {}
  for key, run in old.get("runs", {}).items():
    cell = Cell(run["dataset"], run["variant"], run["seed"])
    if run.get("settings_hash") == settings_hash(cell, mode):
      runs[key] = _from_json(run)
  return runs


# ---------------------------------------------------------------- running

Runner = Callable[[ml_collections.ConfigDict, str], dict[str, Any]]


def train_runner(config: ml_collections.ConfigDict,
                 workdir: str) -> dict[str, Any]:
  """The real runner: one training run in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  from csctr.data import pipeline  # pylint: disable=g-import-not-at-top
  from csctr.training import loop as train  # pylint: disable=g-import-not-at-top
  try:
    record = train.train_and_evaluate(config, workdir)
  finally:
    jax.clear_caches()  # compiled programs of finished runs: memory only
  # The cold items' ceiling, which prepare records beside the Bayes AUC.
  info = pipeline.load_info(pipeline.prepare_dataset(config))
  return {**record, "bayes_auc_cold": info.extras.get("bayes_auc_cold")}


def run_grid(cells: Sequence[Cell], mode: Mode, out_dir: str, work_root: str,
             runner: Runner = train_runner, data_dir: str = "",
             command: str = "", figure: bool = True, readme: str = "",
             log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs every cell not already in out_dir/ablations.json; returns it all."""
  result = {
      "command": command or "python benchmarks/ablations.py",
      "mode": {**dataclasses.asdict(mode)},
      "machine": _machine(),
      "runs": load_previous(out_dir, mode),
  }
  if result["runs"]:
    log(f"resuming: {len(result['runs'])} runs already done")
  for i, cell in enumerate(cells):
    if cell.key in result["runs"]:
      continue
    config = make_config(cell, mode, data_dir)
    if config.model.encoder_init == "none":
      source = Cell(cell.dataset, "none", cell.seed)
      if source.key not in result["runs"]:
        raise RuntimeError(f"{cell.key} needs {source.key} first")
      config.model.encoder_init = workdir_of(work_root, source, mode)
    start = time.perf_counter()
    record = runner(config, workdir_of(work_root, cell, mode))
    wall = time.perf_counter() - start
    result["runs"][cell.key] = {
        "dataset": cell.dataset, "variant": cell.variant, "seed": cell.seed,
        "record": {k: record.get(k) for k in METRICS + (
            "bayes_auc", "bayes_auc_cold", "calibration", "num_impressions",
            "step")},
        "wall_s": round(wall, 1), "settings_hash": settings_hash(cell, mode),
        "overrides": cell_overrides(cell, mode)}
    result["run_wall_s"] = sum(r["wall_s"] for r in result["runs"].values())
    write_outputs(result, out_dir, figure, readme)
    log(f"[{i + 1}/{len(cells)}] {cell.key}: auc={record.get('auc'):.4f} "
        f"cold_auc={record.get('cold_auc'):.4f} ({wall:.0f}s)")
  result["run_wall_s"] = sum(r["wall_s"] for r in result["runs"].values())
  write_outputs(result, out_dir, figure, readme)
  return result


def _machine() -> str:
  try:
    import jax  # pylint: disable=g-import-not-at-top
    backend = jax.default_backend()
  except ImportError:  # pragma: no cover
    backend = "?"
  return f"{backend}, {os.cpu_count()} cores"


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mode", choices=sorted(MODES), default="quick")
  parser.add_argument("--out_dir", default=os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs"))
  parser.add_argument("--work_root", default="/tmp/csctr_ablations",
                      help="run workdirs (checkpoints) go under here")
  parser.add_argument("--data_dir", default="",
                      help="prepared-dataset cache (default: csctr's)")
  parser.add_argument("--datasets", default=",".join(DATASETS))
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--no_dicm", action="store_true")
  parser.add_argument("--readme", default=os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"),
                      help="README whose marked table is rewritten ('' = none)")
  parser.add_argument("--compilation_cache", default=os.path.join(
      os.path.expanduser("~"), ".cache", "csctr_jax"),
                      help="JAX persistent compilation cache ('' = off)")
  args = parser.parse_args(argv)
  from absl import logging  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  if args.compilation_cache:
    # The seeds of a cell compile the same program: compile it once.
    jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  mode = MODES[args.mode]
  cells = grid(mode, args.datasets.split(","), args.variants.split(","),
               dicm=not args.no_dicm)
  work_root = os.path.join(args.work_root, mode.name)
  start = time.perf_counter()
  result = run_grid(cells, mode, args.out_dir, work_root,
                    data_dir=args.data_dir, readme=args.readme,
                    command="python benchmarks/ablations.py " +
                    " ".join(argv if argv is not None else sys.argv[1:]),
                    log=lambda s: print(s, flush=True))
  print(f"done in {time.perf_counter() - start:.0f}s "
        f"({result['run_wall_s']:.0f}s of run wall time in all); "
        f"{os.path.join(args.out_dir, 'results.md')}", flush=True)


if __name__ == "__main__":
  main()
