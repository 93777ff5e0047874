r"""The papers' ablations, run and tabulated: does csctr reproduce the claims?

  # CPU (2 cores, ~20 min): default configs, fixed data, small DICM.
  python benchmarks/ablations.py --mode=quick
  # Accelerator: longer runs, bigger data, data seeds vary too.
  python benchmarks/ablations.py --mode=full --out_dir=/tmp/ablations_full
  # The sparse long-tail log (configs/sparse.py): CSCNN, no image, cold start.
  python benchmarks/ablations.py --mode=sparse --out_dir=docs/sparse

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
import os
import sys
import time
from typing import Any, Callable, Sequence

import ml_collections

from benchmarks import ablations_results as results
from csctr import configlib

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
      "dicm": "dicm", "sparse": "sparse"})
  # The grid main() runs by default, and the README table it rewrites.
  datasets: tuple[str, ...] = results.DATASETS
  variants: tuple[str, ...] = results.PAPER_VARIANTS
  dicm: bool = True
  readme_key: str = "ablations"


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
                        # The published quick numbers were measured so;
                        # a rerun should raise unique_images instead.
                        "data.max_dropped_behavior_fraction": 1.0,
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
    # The sparse long-tail log (configs/sparse.py as written: its own steps,
    # validation evals, best-checkpoint test eval), CSCNN against the
    # no-image model (with the config's id dropout, and without) and the
    # baselines, and CSCNN with the content back-off.
    "sparse": Mode(
        "sparse", seeds=3, dicm_seeds=0, vary_data_seed=False, overrides={},
        dicm_overrides={}, datasets=("sparse",),
        variants=("no_image", "no_image_full_ids", "cscnn", "cscnn_backoff"),
        dicm=False, readme_key="sparse"),
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


def grid(mode: Mode, datasets: Sequence[str] = results.DATASETS,
         variants: Sequence[str] | None = None, dicm: bool = True
         ) -> list[Cell]:
  """The cells in run order: `none` precedes `late_fusion` of its seed."""
  variants = list(results.VARIANTS) if variants is None else list(variants)
  run_order = ["none"] + [v for v in results.VARIANTS if v != "none"]
  cells = [Cell(d, v, s) for d in datasets for s in range(mode.seeds)
           for v in run_order if v in variants]
  if dicm:
    cells += [Cell("dicm", v, s) for s in range(mode.dicm_seeds)
              for v in results.DICM_VARIANTS]
  return cells


def cell_overrides(cell: Cell, mode: Mode) -> dict[str, Any]:
  """The dotted config overrides of one cell (recorded beside its result)."""
  out = dict(mode.dicm_overrides if cell.dataset == "dicm" else mode.overrides)
  dicm = cell.dataset == "dicm"
  model = (results.DICM_VARIANTS if dicm else results.VARIANTS)[cell.variant]
  out.update({f"model.{k}": v for k, v in model.items()})
  out["seed"] = cell.seed
  out["data.shuffle_seed"] = cell.seed
  if mode.vary_data_seed:
    source = (cell.dataset if cell.dataset in ("fashion_mnist", "sparse")
              else "synthetic")
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
      runs[key] = results.from_json(run)
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
  record = {**record, "bayes_auc_cold": info.extras.get("bayes_auc_cold")}
  # The non-visual baselines of the same split (WORKDIR/baselines.json).
  path = os.path.join(workdir, "baselines.json")
  if os.path.exists(path):
    with open(path) as f:
      record["baselines"] = json.load(f).get("test", {})
  return record


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
        "record": {k: record.get(k) for k in results.METRICS + (
            "bayes_auc", "bayes_auc_cold", "calibration", "num_impressions",
            "step")},
        "wall_s": round(wall, 1), "settings_hash": settings_hash(cell, mode),
        "overrides": cell_overrides(cell, mode),
        "baselines": {name: {k: values.get(k) for k in results.METRICS}
                      for name, values in record.get("baselines", {}).items()}}
    result["run_wall_s"] = sum(r["wall_s"] for r in result["runs"].values())
    results.write_outputs(result, out_dir, figure, readme, mode.readme_key)
    log(f"[{i + 1}/{len(cells)}] {cell.key}: auc={record.get('auc'):.4f} "
        f"cold_auc={record.get('cold_auc'):.4f} ({wall:.0f}s)")
  result["run_wall_s"] = sum(r["wall_s"] for r in result["runs"].values())
  results.write_outputs(result, out_dir, figure, readme, mode.readme_key)
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
  parser.add_argument("--datasets", default="",
                      help="comma-separated (default: the mode's)")
  parser.add_argument("--variants", default="",
                      help="comma-separated (default: the mode's)")
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
  cells = grid(mode, (args.datasets or ",".join(mode.datasets)).split(","),
               (args.variants or ",".join(mode.variants)).split(","),
               dicm=mode.dicm and not args.no_dicm)
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
