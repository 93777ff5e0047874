"""benchmarks/ablations.py: grid, aggregation, outputs, resume; encoder_init.

The grid machinery is tested with a stub runner (exact, instant); the one
real training path it adds (late fusion from a pretrained encoder via
config.model.encoder_init) is tested on the tiny config.
"""

import dataclasses
import json
import os

from flax import nnx
import jax
import numpy as np
import pytest

from benchmarks import ablations
from benchmarks import ablations_results as results
from configs import tiny
from csctr.model import ctr
from csctr.training import optim
from csctr import rundir
from csctr.training import loop as train


SMOKE = ablations.Mode(
    "smoke", seeds=2, dicm_seeds=1, vary_data_seed=True,
    overrides={"num_train_steps": 3}, dicm_overrides={"num_train_steps": 2},
    base={"synthetic": "tiny", "fashion_mnist": "tiny", "dicm": "tiny"})

# A made-up metric surface: variant quality + a seed effect, so every mean,
# std and paired difference below is known in closed form.
QUALITY = {v: 0.01 * i for i, v in enumerate(
    list(results.VARIANTS) + list(results.DICM_VARIANTS))}


def _stub_runner(calls):
  def run(config, workdir):
    calls.append((config, workdir))
    variant = workdir.split(os.sep)[-2]
    seed = config.seed
    return {"auc": 0.6 + QUALITY[variant] + 0.002 * seed,
            "gauc": 0.55 + QUALITY[variant],
            "cold_auc": 0.58 + QUALITY[variant] - 0.004 * seed,
            "logloss": 0.4 - QUALITY[variant], "bayes_auc": 0.8,
            "bayes_auc_cold": 0.75,
            "calibration": 1.0, "num_impressions": 10, "step": 3,
            "baselines": {"item_ctr": {"auc": 0.55 + 0.01 * seed,
                                       "gauc": 0.5, "cold_auc": 0.5,
                                       "logloss": 0.5}}}
  return run


def test_grid_order_and_overrides():
  cells = ablations.grid(SMOKE, ("synthetic",), ("cbam", "late_fusion",
                                                 "none"))
  assert [c.key for c in cells] == [
      "synthetic/none/seed0", "synthetic/late_fusion/seed0",
      "synthetic/cbam/seed0", "synthetic/none/seed1",
      "synthetic/late_fusion/seed1", "synthetic/cbam/seed1",
      "dicm/dicm_none/seed0", "dicm/dicm_sum/seed0", "dicm/dicm_max/seed0",
      "dicm/dicm_attentive/seed0", "dicm/dicm_multi_query/seed0"]
  config = ablations.make_config(cells[5], SMOKE)
  assert config.seed == 1 and config.data.shuffle_seed == 1
  assert config.synthetic.seed == 1  # vary_data_seed
  assert config.model.attention == "cbam" and config.num_train_steps == 3
  fm = ablations.make_config(ablations.Cell("fashion_mnist", "se", 1),
                             dataclasses.replace(SMOKE, vary_data_seed=False))
  assert fm.dataset == "fashion_mnist" and fm.fashion_mnist.seed == 0
  quick = ablations.make_config(ablations.Cell("dicm", "dicm_max", 0),
                                ablations.MODES["quick"])
  assert quick.data.num_behaviors == 3 and quick.data.image_size == 16
  assert quick.model.behavior_pooling == "max"
  # A settings change gives a new workdir, never a stale resume.
  a = ablations.workdir_of("/r", cells[0], SMOKE)
  b = ablations.workdir_of("/r", cells[0], dataclasses.replace(
      SMOKE, overrides={"num_train_steps": 4}))
  assert a != b and a.startswith("/r/synthetic/none/seed0-")


def test_stats_and_verdicts():
  mean, std, n = results.mean_std([0.70, 0.72, None, float("nan"), 0.74])
  assert n == 3 and mean == pytest.approx(0.72)
  assert std == pytest.approx(np.std([0.70, 0.72, 0.74], ddof=1))
  assert np.isnan(results.mean_std([0.7])[1])
  assert results.verdict(0.01, 0.001, 3) == "holds"
  assert results.verdict(-0.01, 0.001, 3) == "reversed"
  assert results.verdict(0.001, 0.01, 3) == "within noise"
  # A paired t-test, not 2 standard errors: with 3 seeds t_{0.975,2} = 4.30.
  assert results.verdict(0.01, 0.005, 3) == "within noise"
  assert results.verdict(0.01, 0.005, 11) == "holds"  # t_{0.975,10} = 2.23
  assert results.verdict(0.001, float("nan"), 1) == "holds?"
  assert results.verdict(float("nan"), float("nan"), 0) == "not run"


def test_run_grid_aggregates_writes_and_resumes(tmp_path):
  out, work = str(tmp_path / "out"), str(tmp_path / "work")
  variants = ("no_image", "none", "late_fusion", "cbam", "cscnn")
  cells = ablations.grid(SMOKE, ("synthetic",), variants)
  calls = []
  result = ablations.run_grid(cells, SMOKE, out, work, _stub_runner(calls),
                              command="ablations --smoke", log=lambda _: None)
  assert len(calls) == len(cells) == 2 * 5 + 5

  # late_fusion loads the encoder of the same seed's `none` run.
  for config, workdir in calls:
    if "/late_fusion/" in workdir:
      source = ablations.Cell("synthetic", "none", config.seed)
      assert config.model.encoder_init == ablations.workdir_of(
          work, source, SMOKE)
      assert config.model.late_fusion

  rows = {(r["dataset"], r["variant"]): r for r in result["summary"]}
  cscnn = rows[("synthetic", "cscnn")]
  expected = [0.6 + QUALITY["cscnn"] + 0.002 * s for s in (0, 1)]
  assert cscnn["auc"]["mean"] == pytest.approx(np.mean(expected))
  assert cscnn["auc"]["std"] == pytest.approx(np.std(expected, ddof=1))
  assert cscnn["seeds"] == [0, 1] and cscnn["auc"]["n"] == 2
  assert cscnn["bayes_auc"]["mean"] == pytest.approx(0.8)
  assert cscnn["bayes_auc_cold"]["mean"] == pytest.approx(0.75)
  assert rows[("dicm", "dicm_sum")]["auc"]["n"] == 1
  assert np.isnan(rows[("dicm", "dicm_sum")]["auc"]["std"])

  # Paired claim: the gap is constant across seeds -> std 0 -> holds.
  claims = {(c["claim"], c["dataset"]): c for c in result["claims"]}
  gap = claims[("category-specific attention beats CBAM", "synthetic")]
  assert gap["auc"]["mean"] == pytest.approx(QUALITY["cscnn"] -
                                             QUALITY["cbam"])
  assert gap["auc"]["verdict"] == "holds"
  assert ("category-specific attention beats SE", "synthetic") not in claims
  # cold AUC - AUC moves alike for every variant here: no extra cold gain.
  cold = claims[("images help cold items more (Δ of cold AUC − AUC)",
                 "synthetic")]
  assert cold["cold_gap"]["mean"] == pytest.approx(0.0, abs=1e-12)
  assert cold["cold_gap"]["verdict"] == "within noise"

  with open(os.path.join(out, "ablations.json")) as f:
    saved = json.load(f)
  assert set(saved["runs"]) == {c.key for c in cells}
  assert saved["runs"]["synthetic/cbam/seed1"]["overrides"]["seed"] == 1
  assert saved["mode"]["overrides"] == {"num_train_steps": 3}
  # NaN std of the one-seed DICM rows is written as JSON null.
  dicm = [r for r in saved["summary"] if r["variant"] == "dicm_sum"][0]
  assert dicm["auc"]["std"] is None
  md = open(os.path.join(out, "results.md")).read()
  assert "`ablations --smoke`" in md
  assert f"| cscnn | {np.mean(expected):.4f} ± " \
         f"{np.std(expected, ddof=1):.4f} |" in md
  assert "| 0.8000 (0.7500) | 2 |" in md
  assert "| category-specific attention beats CBAM | synthetic | +0.0" in md
  assert os.path.getsize(os.path.join(out, "ablations.png")) > 1000

  # Killed and restarted: finished runs come from the JSON, not the runner.
  def must_not_run(config, workdir):
    raise AssertionError(f"re-ran {workdir}")
  again = ablations.run_grid(cells, SMOKE, out, work, must_not_run,
                             log=lambda _: None)
  assert ([(r["variant"], r["auc"]["mean"]) for r in again["summary"]]
          == [(r["variant"], r["auc"]["mean"]) for r in result["summary"]])
  # One more cell: only it runs; a hand-written tail of results.md is kept.
  tail = f"{results.KEEP_MARKER}\n## By hand\n\n| x | 1 |\n"
  with open(os.path.join(out, "results.md"), "a") as f:
    f.write(tail)
  calls.clear()
  more = cells + [ablations.Cell("synthetic", "se", 0)]
  ablations.run_grid(more, SMOKE, out, work, _stub_runner(calls),
                     log=lambda _: None)
  assert [w.split(os.sep)[-2] for _, w in calls] == ["se"]
  md = open(os.path.join(out, "results.md")).read()
  assert md.endswith(tail) and md.count(results.KEEP_MARKER) == 1
  assert "| se |" in md


def test_encoder_init_loads_a_frozen_pretrained_encoder(tmp_path):
  data_dir = str(tmp_path / "data")

  def config(**model):
    c = tiny.get_config()
    c.data_dir = data_dir
    c.num_train_steps, c.eval_every, c.checkpoint_every = 6, 0, 0
    c.model.attention = "none"
    for k, v in model.items():
      c.model[k] = v
    return c

  source_dir, fused_dir = str(tmp_path / "none"), str(tmp_path / "fused")
  train.train_and_evaluate(config(), source_dir)
  train.train_and_evaluate(
      config(late_fusion=True, encoder_init=source_dir), fused_dir)

  def params(workdir):
    model = rundir.restore_model(workdir)[0]
    return jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]

  pairs = list(zip(params(source_dir), params(fused_dir)))
  encoder = [(a, b) for (path, a), (_, b) in pairs
             if ctr.is_encoder_param(optim.key_path_to_tuple(path))]
  others = [(a, b) for (path, a), (_, b) in pairs
            if not ctr.is_encoder_param(optim.key_path_to_tuple(path))]
  assert encoder and others
  for a, b in encoder:  # loaded, then frozen for 6 steps: bit-identical
    np.testing.assert_array_equal(a, b)
  # The CTR part was trained afresh (same init seed, different features).
  assert any(not np.array_equal(a, b) for a, b in others)


def test_readme_table_is_rewritten_between_markers(tmp_path):
  rows = [
      {"dataset": "synthetic", "variant": v, "auc": {"mean": a, "std": 0.01},
       "cold_auc": {"mean": a - 0.1, "std": float("nan")},
       "bayes_auc": {"mean": 0.8, "std": 0.0},
       "bayes_auc_cold": {"mean": 0.81, "std": 0.0}}
      for v, a in (("cscnn", 0.7), ("no_image", 0.6))]
  table = results.readme_table(rows)
  lines = table.splitlines()
  assert lines[0] == "| model | synthetic AUC | synthetic cold AUC |"
  # Variants come in the grid's order, whatever order the rows are in.
  assert lines[2] == "| no_image | 0.600 ± 0.010 | 0.500 |"
  assert lines[3] == "| cscnn | 0.700 ± 0.010 | 0.600 |"
  assert lines[4] == "| Bayes-optimal | 0.800 | 0.810 |"
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{results.README_BEGIN}\nold table\n"
                    f"{results.README_END}\noutro\n")
  assert results.update_readme(str(readme), table)
  assert readme.read_text() == (f"intro\n{results.README_BEGIN}\n{table}\n"
                                f"{results.README_END}\noutro\n")
  plain = tmp_path / "plain.md"
  plain.write_text("no markers\n")
  assert not results.update_readme(str(plain), table)
  assert plain.read_text() == "no markers\n"


def test_baselines_appear_once_per_seed_beside_the_models(tmp_path):
  cells = ablations.grid(SMOKE, ("synthetic",), ("none", "cscnn"),
                         dicm=False)
  calls = []
  result = ablations.run_grid(cells, SMOKE, str(tmp_path / "out"),
                              str(tmp_path / "work"), _stub_runner(calls),
                              figure=False)
  rows = {r["variant"]: r for r in results.summarize(result["runs"])}
  row = rows["baseline_item_ctr"]
  seeds = sorted({c.seed for c in cells})
  assert row["seeds"] == seeds  # one per seed, not one per variant
  assert row["auc"]["mean"] == pytest.approx(
      np.mean([0.55 + 0.01 * s for s in seeds]))
  assert list(rows)[0] == "baseline_item_ctr"  # baselines first
  assert "baseline_item_ctr" in results.markdown(result)
  # Baselines are paired with the model run of the same seed.
  claims = {c["claim"]: c for c in result["claims"]}
  gap = claims["CSCNN beats the item_ctr baseline"]["auc"]
  diffs = [0.6 + QUALITY["cscnn"] + 0.002 * s - (0.55 + 0.01 * s)
           for s in seeds]
  assert gap["mean"] == pytest.approx(np.mean(diffs))
  assert gap["std"] == pytest.approx(np.std(diffs, ddof=1))


def test_sparse_mode_runs_its_own_grid_and_readme_table(tmp_path):
  mode = ablations.MODES["sparse"]
  cells = ablations.grid(mode, mode.datasets, mode.variants, dicm=mode.dicm)
  assert {c.dataset for c in cells} == {"sparse"}
  assert len(cells) == mode.seeds * len(mode.variants)
  config = ablations.make_config(cells[0], mode)
  assert config.dataset == "sparse" and config.data.batching == "auto"
  assert config.data.validation_fraction > 0
  readme = tmp_path / "README.md"
  begin, end = results.readme_markers("sparse")
  readme.write_text(f"{results.README_BEGIN}\nA\n{results.README_END}\n"
                    f"{begin}\nB\n{end}\n")
  assert results.update_readme(str(readme), "T", "sparse")
  assert readme.read_text() == (f"{results.README_BEGIN}\nA\n"
                                f"{results.README_END}\n{begin}\nT\n{end}\n")
  # Baselines lead the table; the Bayes row comes from a model row.
  nan = {"mean": float("nan"), "std": float("nan")}
  rows = [{"dataset": "sparse", "variant": "baseline_id_lr",
           "auc": {"mean": 0.59, "std": 0.0},
           "cold_auc": {"mean": 0.58, "std": 0.0}, "bayes_auc": nan,
           "bayes_auc_cold": nan},
          {"dataset": "sparse", "variant": "cscnn",
           "auc": {"mean": 0.6, "std": 0.01},
           "cold_auc": {"mean": 0.61, "std": 0.01},
           "bayes_auc": {"mean": 0.79, "std": 0.0},
           "bayes_auc_cold": {"mean": 0.8, "std": 0.0}}]
  lines = results.readme_table(rows).splitlines()
  assert lines[2] == "| baseline_id_lr | 0.590 ± 0.000 | 0.580 ± 0.000 |"
  assert lines[-1] == "| Bayes-optimal | 0.790 | 0.800 |"
