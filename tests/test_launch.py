"""The launch scripts cannot reach a cloud here; their --dry-run output is what we test."""

import os
import pathlib
import shlex
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _dry_run(script: str, *args: str, **env: str) -> list[str]:
  full_env = {**os.environ, **env}
  out = subprocess.run(
      ["bash", str(ROOT / "launch" / script), "--dry-run", *args],
      env=full_env, check=True, capture_output=True, text=True).stdout
  return [line for line in out.splitlines() if line.strip()]


def test_tpu_vm_setup_installs_on_every_worker():
  lines = _dry_run("tpu_vm.sh", "setup", TPU_NAME="pod", ZONE="europe-west4-a")
  assert len(lines) == 2
  scp, ssh = (shlex.split(line) for line in lines)
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert "--worker=all" in scp and "--zone=europe-west4-a" in scp
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
  assert "--worker=all" in ssh
  command = next(a for a in ssh if a.startswith("--command="))
  assert "pip install -q -e ." in command


def test_tpu_vm_run_passes_config_overrides_through():
  lines = _dry_run("tpu_vm.sh", "run", "--", "--config=configs/default.py:attention=cbam",
                   "--config.num_train_steps=7", WORKDIR="gs://bucket/exp1")
  (ssh,) = (shlex.split(line) for line in lines)
  command = next(a for a in ssh if a.startswith("--command="))
  inner = shlex.split(command.split("=", 1)[1].split("&&", 1)[1])
  assert inner[:3] == ["python3", "-m", "csctr.main"]
  assert "--distributed=true" in inner  # every worker joins one JAX job
  assert "--workdir=gs://bucket/exp1" in inner
  assert "--config=configs/default.py:attention=cbam" in inner
  assert "--config.num_train_steps=7" in inner


def test_tpu_vm_run_requires_workdir():
  env = {k: v for k, v in os.environ.items() if k != "WORKDIR"}
  proc = subprocess.run(["bash", str(ROOT / "launch" / "tpu_vm.sh"), "--dry-run", "run"],
                        env=env, capture_output=True, text=True)
  assert proc.returncode != 0 and "WORKDIR" in proc.stderr


@pytest.mark.parametrize("nodes,gpus", [(1, 8), (4, 2)])
def test_slurm_script_runs_one_process_per_gpu(nodes, gpus):
  lines = _dry_run("slurm_gpu.sh", "--", "--config=configs/default.py",
                   WORKDIR="/shared/run", NODES=str(nodes), GPUS_PER_NODE=str(gpus))
  assert lines[0] == "#!/usr/bin/env bash"
  assert f"#SBATCH --nodes={nodes}" in lines
  assert f"#SBATCH --ntasks-per-node={gpus}" in lines
  assert "#SBATCH --gpus-per-task=1" in lines
  srun = shlex.split(lines[-1])
  assert srun[:4] == ["srun", "python", "-m", "csctr.main"]
  assert "--distributed=true" in srun and "--workdir=/shared/run" in srun
  assert "--config=configs/default.py" in srun
