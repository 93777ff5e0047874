"""What the ablation grid compares, and how its runs become results.

The variants and the papers' claims (VARIANTS, DICM_VARIANTS, CLAIMS),
seed aggregation with paired differences and t-based verdicts, and the
outputs: ablations.json, results.md, ablations.png and the README table.
benchmarks/ablations.py runs the grid and calls write_outputs.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

import numpy as np

from csctr import metrics as metrics_lib


METRICS = ("auc", "gauc", "cold_auc", "logloss")
# csctr/training/baselines.py's, listed first in every table.
BASELINES = ("popularity", "item_ctr", "user_category", "id_lr")
DATASETS = ("synthetic", "fashion_mnist")
# Every benchmark a table can hold, in table order (sparse: configs/sparse.py,
# run by benchmarks/ablations.py --mode=sparse).
ALL_DATASETS = DATASETS + ("sparse",)
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
    # Sparse benchmark extras: the no-image model without the config's id
    # dropout, and CSCNN with the content back-off (config.model.item_backoff;
    # the config's id dropout trains the OOV row and the projection).
    "no_image_full_ids": {"use_image": False, "id_dropout": 0.0},
    "cscnn_backoff": {"attention": "cscnn", "item_backoff": True},
}
# The papers' grid (the default --variants): the sparse extras are not in it.
PAPER_VARIANTS = tuple(v for v in VARIANTS
                       if v not in ("no_image_full_ids", "cscnn_backoff"))
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
    *((f"CSCNN beats the {b} baseline", "cscnn", f"baseline_{b}")
      for b in BASELINES),
    ("images help (CSCNN vs no image without id dropout)", "cscnn",
     "no_image_full_ids"),
    ("content back-off helps", "cscnn_backoff", "cscnn"),
    ("behaviour images add on top (sum)", "dicm_sum", "dicm_none"),
    ("behaviour images add on top (max)", "dicm_max", "dicm_none"),
    ("behaviour images add on top (attentive)", "dicm_attentive", "dicm_none"),
    ("behaviour images add on top (multi-query)", "dicm_multi_query",
     "dicm_none"),
)


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
    # Baselines beside the model rows: fitted on the same train split and
    # scored on the same test split, once per (dataset, seed) run.
    for name, values in run.get("baselines", {}).items():
      members = groups.setdefault((run["dataset"], f"baseline_{name}"), [])
      if all(m["seed"] != run["seed"] for m in members):
        members.append({"seed": run["seed"], "wall_s": 0.0, "record": values})
  order = {v: i for i, v in enumerate(
      [f"baseline_{b}" for b in BASELINES] + list(VARIANTS)
      + list(DICM_VARIANTS))}
  rows = []
  for (dataset, variant), members in sorted(
      groups.items(), key=lambda kv: (
          (list(ALL_DATASETS) + ["dicm"]).index(kv[0][0])
          if kv[0][0] in list(ALL_DATASETS) + ["dicm"] else 99,
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
  resolves smaller differences than comparing the two means. `worse` may be
  'baseline_<name>': the baseline scored beside the better run's seed.
  """
  by_seed: dict[str, dict[int, float]] = {better: {}, worse: {}}
  for run in runs.values():
    if run["dataset"] != dataset:
      continue
    records = {run["variant"]: run["record"]}
    records.update({f"baseline_{name}": values for name, values in
                    run.get("baselines", {}).items()})
    for variant, record in records.items():
      if variant not in by_seed:
        continue
      if metric == "cold_gap":
        cold, auc = record.get("cold_auc"), record.get("auc")
        value = None if cold is None or auc is None else cold - auc
      else:
        value = record.get(metric)
      if value is not None and np.isfinite(value):
        by_seed[variant][run["seed"]] = value
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
  present = [d for d in ALL_DATASETS
             if any(r["dataset"] == d for r in runs.values())]
  for name, better, worse, *metric in CLAIMS:
    datasets = ("dicm",) if better.startswith("dicm") else present
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


def from_json(obj: Any) -> Any:
  """None (strict JSON's NaN) back to NaN inside metric stats."""
  if isinstance(obj, dict):
    return {k: (float("nan") if v is None and k in ("mean", "std") else
                from_json(v)) for k, v in obj.items()}
  if isinstance(obj, list):
    return [from_json(v) for v in obj]
  return obj


def markdown(result: dict[str, Any]) -> str:
  """The results page: settings, command, wall time, tables, claims."""
  mode = result["mode"]
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
  lines += _model_tables(result["summary"])
  lines += _claims_lines(result.get("claims") or [])
  lines += ["## Settings", "", "Every cell (dotted config overrides):", "",
            "```", json.dumps(mode["overrides"], sort_keys=True), "```", "",
            "DICM cells (on configs/dicm.py):", "", "```",
            json.dumps(mode["dicm_overrides"], sort_keys=True), "```", ""]
  if result.get("figure"):
    lines += [f"![AUC and cold AUC per model]({result['figure']})", ""]
  return "\n".join(lines)


def _model_tables(rows: list[dict[str, Any]]) -> list[str]:
  """One Markdown table of every model's metrics per benchmark."""
  titles = {"synthetic": "Synthetic (default config)",
            "fashion_mnist": "Fashion-MNIST (configs/fashion_mnist.py)",
            "sparse": "Sparse long-tail log (configs/sparse.py)",
            "dicm": "DICM behaviour images (synthetic with behaviour lists)"}
  lines = []
  for dataset in ALL_DATASETS + ("dicm",):
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
  return lines


def _claims_lines(claims: list[dict[str, Any]]) -> list[str]:
  """The claims table: paired differences and verdicts."""
  if not claims:
    return []
  lines = ["## The papers' claims, as paired differences", "",
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
  return lines


def readme_markers(key: str = "ablations") -> tuple[str, str]:
  """The README lines around a mode's table (each mode keeps its own)."""
  return (f"<!-- {key} table: generated by benchmarks/ablations.py -->",
          f"<!-- end of {key} table -->")


README_BEGIN, README_END = readme_markers()
# results.md from this line on is written by hand (other experiments' results,
# e.g. the OOV-row runs of docs/scaling.md) and kept when the tables are.
KEEP_MARKER = "<!-- not generated: kept by benchmarks/ablations.py -->"


def readme_table(rows: list[dict[str, Any]]) -> str:
  """The README's compact table: AUC and cold AUC per variant and dataset."""
  datasets = [d for d in ALL_DATASETS
              if any(r["dataset"] == d for r in rows)]
  by_key = {(r["dataset"], r["variant"]): r for r in rows}
  variants = [v for v in [f"baseline_{b}" for b in BASELINES] + list(VARIANTS)
              if any((d, v) in by_key for d in datasets)]
  head = "| model | " + " | ".join(
      f"{d} AUC | {d} cold AUC" for d in datasets) + " |"
  lines = [head, "|---" * (1 + 2 * len(datasets)) + "|"]
  empty = {"mean": float("nan"), "std": float("nan")}
  for v in variants + ["bayes"]:
    cells = []
    for d in datasets:
      if v == "bayes":
        ref = next(r for r in rows if r["dataset"] == d  # a model row
                   and not r["variant"].startswith("baseline_"))
        cold = ref.get("bayes_auc_cold", empty)
        cells += [_fmt(dict(ref["bayes_auc"], std=float("nan")), 3),
                  _fmt(dict(cold, std=float("nan")), 3)]
      else:
        r = by_key.get((d, v), {})
        cells += [_fmt(r.get("auc", empty), 3), _fmt(r.get("cold_auc", empty), 3)]
    lines.append(f"| {'Bayes-optimal' if v == 'bayes' else v} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def update_readme(path: str, table: str, key: str = "ablations") -> bool:
  """Replaces the text between the README's `key` markers; False if absent."""
  begin, end = readme_markers(key)
  with open(path) as f:
    text = f.read()
  if begin not in text or end not in text:
    return False
  head, rest = text.split(begin, 1)
  _, tail = rest.split(end, 1)
  with open(path, "w") as f:
    f.write(f"{head}{begin}\n{table}\n{end}{tail}")
  return True


def plot(rows: list[dict[str, Any]], path: str) -> None:
  """Bars of AUC and cold AUC (± std) per model, one panel per benchmark."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  datasets = [d for d in ALL_DATASETS + ("dicm",)
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
                  figure: bool = True, readme: str = "",
                  readme_key: str = "ablations") -> None:
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
  path = os.path.join(out_dir, "results.md")
  kept = ""  # hand-written sections after KEEP_MARKER survive a rewrite
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
    if KEEP_MARKER in text:
      kept = "\n" + text[text.index(KEEP_MARKER):]
  with open(path, "w") as f:
    f.write(markdown(result) + kept)
  if readme and result["summary"]:
    update_readme(readme, readme_table(result["summary"]), readme_key)
