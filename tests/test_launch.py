"""The launch scripts: their commands (--dry-run), and what they do on a worker.

No cloud is reachable here. The dry-run output is checked for the commands a
user's gcloud / sbatch would get; and a stand-in `gcloud` that runs each
--command in a local "worker home" (and copies scp's file there) lets sync,
setup's idempotence and a detached run with its logs run for real.
"""

import os
import pathlib
import shlex
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu_vm.sh"


def _dry_run(script: str, *args: str, **env: str) -> list[str]:
  full_env = {**os.environ, **env}
  out = subprocess.run(
      ["bash", str(ROOT / "launch" / script), "--dry-run", *args],
      env=full_env, check=True, capture_output=True, text=True).stdout
  return [line for line in out.splitlines() if line.strip()]


def _ssh_command(line: str) -> tuple[list[str], str]:
  words = shlex.split(line)
  return words, next(a for a in words if a.startswith("--command="))[10:]


def test_tpu_vm_setup_syncs_then_installs_python_311_venv():
  lines = _dry_run("tpu_vm.sh", "setup", TPU_NAME="pod", ZONE="europe-west4-a",
                   ARCHIVE="/tmp/src.tgz")
  pack, scp, unpack, setup = lines
  assert "git ls-files -z --cached --others --exclude-standard |" in pack
  assert pack.endswith("-czf /tmp/src.tgz")
  scp = shlex.split(scp)
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert "--recurse" not in scp  # a second scp --recurse nested the copy
  assert scp[5:7] == ["/tmp/src.tgz", "pod:csctr-src.tar.gz"]
  assert "--worker=all" in scp and "--zone=europe-west4-a" in scp
  words, command = _ssh_command(unpack)
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
  assert "--worker=all" in words
  assert "mv ~/csctr.new ~/csctr" in command
  _, command = _ssh_command(setup)
  assert "uv venv --python 3.11 ~/csctr-venv" in command
  assert 'uv pip install -q --python ~/csctr-venv/bin/python -e "$HOME/csctr[gcp]"' in command


def test_tpu_vm_run_is_detached_and_passes_config_overrides_through():
  lines = _dry_run("tpu_vm.sh", "run", "--", "--config=configs/default.py:attention=cbam",
                   "--config.num_train_steps=7", WORKDIR="gs://bucket/exp1")
  (line,) = lines
  words, command = _ssh_command(line)
  assert "--worker=all" in words
  inner = shlex.split(command.split("&&", 1)[1])
  assert inner[:3] == ["nohup", "setsid", "launch/tpu_worker.sh"]
  assert inner[3:6] == ["gs://bucket/exp1",
                        "--config=configs/default.py:attention=cbam",
                        "--config.num_train_steps=7"]
  assert inner[6:12] == [">", "/dev/null", "2>&1", "<", "/dev/null", "&"]


def test_tpu_vm_logs_follows_one_worker():
  (line,) = _dry_run("tpu_vm.sh", "logs", WORKER="3")
  words, command = _ssh_command(line)
  assert "--worker=3" in words
  assert command == "tail -n 200 -F ~/csctr-logs/latest.log"


def test_tpu_vm_run_requires_workdir():
  env = {k: v for k, v in os.environ.items() if k != "WORKDIR"}
  proc = subprocess.run(["bash", str(TPU), "--dry-run", "run"],
                        env=env, capture_output=True, text=True)
  assert proc.returncode != 0 and "WORKDIR" in proc.stderr


# Stands in for gcloud on one worker: scp copies into $WORKER_HOME, ssh runs
# --command there with HOME=$WORKER_HOME.
_FAKE_GCLOUD = r"""#!/usr/bin/env bash
echo "$*" >> "$WORKER_HOME/../gcloud.log"
if [[ "$4" == scp ]]; then cp "$5" "$WORKER_HOME/${6#*:}"; exit; fi
for a in "$@"; do
  if [[ "$a" == --command=* ]]; then
    HOME="$WORKER_HOME" exec bash -c "${a#--command=}"
  fi
done
"""

_FAKE_PYTHON = """#!/usr/bin/env bash
echo "trainer args: $*"
exit 3
"""


@pytest.fixture
def worker(tmp_path):
  """A checkout (git repo), a worker home and a PATH with the fake gcloud."""
  repo = tmp_path / "repo"
  (repo / "launch").mkdir(parents=True)
  for name in ("tpu_vm.sh", "tpu_worker.sh"):
    (repo / "launch" / name).write_bytes((ROOT / "launch" / name).read_bytes())
    (repo / "launch" / name).chmod(0o755)
  (repo / "keep.py").write_text("v1")
  (repo / "gone.py").write_text("deleted later")
  (repo / ".gitignore").write_text("ignored/\n")
  (repo / "ignored").mkdir()
  (repo / "ignored" / "big.bin").write_text("not synced")
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
  home = tmp_path / "home"
  home.mkdir()
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(_FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
         "WORKER_HOME": str(home), "ARCHIVE": str(tmp_path / "src.tgz")}
  return repo, home, env


def _files(root: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*")
          if p.is_file()}


def test_sync_mirrors_the_checkout_and_is_idempotent(worker):
  repo, home, env = worker
  sync = ["bash", str(repo / "launch" / "tpu_vm.sh"), "sync"]
  subprocess.run(sync, env=env, check=True, capture_output=True)
  first = _files(home / "csctr")
  assert first["keep.py"] == "v1" and "gone.py" in first
  assert not any(k.startswith(("ignored", ".git/")) for k in first)
  subprocess.run(sync, env=env, check=True, capture_output=True)
  assert _files(home / "csctr") == first  # a second sync changes nothing
  (repo / "keep.py").write_text("v2")
  (repo / "gone.py").unlink()
  (repo / "new.py").write_text("untracked, not ignored")
  subprocess.run(sync, env=env, check=True, capture_output=True)
  now = _files(home / "csctr")
  assert now["keep.py"] == "v2" and now["new.py"].startswith("untracked")
  assert "gone.py" not in now and not (home / "csctr" / "csctr").exists()


def test_run_detaches_and_copies_the_log_into_the_workdir(worker, tmp_path):
  repo, home, env = worker
  subprocess.run(["bash", str(repo / "launch" / "tpu_vm.sh"), "sync"],
                 env=env, check=True, capture_output=True)
  python = tmp_path / "python"
  python.write_text(_FAKE_PYTHON)
  python.chmod(0o755)
  workdir = tmp_path / "workdir"
  proc = subprocess.run(
      ["bash", str(repo / "launch" / "tpu_vm.sh"), "run", "--",
       "--config=configs/tiny.py", "--config.note=a b"],
      env={**env, "WORKDIR": str(workdir), "PYTHON": str(python)},
      capture_output=True, text=True, timeout=30, check=True)
  assert proc.stdout.startswith("started on ")  # returned at once
  host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
  log = workdir / "logs" / f"{host}.log"
  deadline = time.monotonic() + 20
  while not (log.exists() and "exited with status" in log.read_text()):
    assert time.monotonic() < deadline, "the worker never copied its log"
    time.sleep(0.1)
  text = log.read_text()
  assert (f"trainer args: -m csctr.main --distributed=true --workdir={workdir} "
          "--config=configs/tiny.py --config.note=a b") in text
  assert "csctr.main exited with status 3" in text
  latest = home / "csctr-logs" / "latest.log"
  assert latest.read_text() == text


@pytest.mark.parametrize("nodes,gpus", [(1, 8), (4, 2)])
def test_slurm_script_allocates_gpus_per_node_without_task_binding(nodes, gpus):
  lines = _dry_run("slurm_gpu.sh", "--", "--config=configs/default.py",
                   WORKDIR="/shared/run", NODES=str(nodes), GPUS_PER_NODE=str(gpus))
  assert lines[0] == "#!/usr/bin/env bash"
  assert f"#SBATCH --nodes={nodes}" in lines
  assert f"#SBATCH --ntasks-per-node={gpus}" in lines
  assert f"#SBATCH --gpus-per-node={gpus}" in lines
  assert not any("gpus-per-task" in line or "gpu-bind" in line for line in lines)
  assert "#SBATCH --output=/shared/run/slurm-%j.out" in lines
  srun = shlex.split(lines[-1])
  assert srun[:4] == ["srun", "python", "-m", "csctr.main"]
  assert "--distributed=true" in srun and "--workdir=/shared/run" in srun
  assert "--config=configs/default.py" in srun


def test_slurm_script_with_a_bucket_workdir_logs_locally():
  lines = _dry_run("slurm_gpu.sh", "--", WORKDIR="gs://bucket/run",
                   LOG_DIR="/home/me/logs")
  assert "#SBATCH --output=/home/me/logs/slurm-%j.out" in lines
  assert "--workdir=gs://bucket/run" in shlex.split(lines[-1])
