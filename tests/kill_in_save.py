"""`python -m csctr.main` that SIGKILLs itself inside the save of one step.

A deterministic kill -9 just after a checkpoint: every process of a run
dies inside the save of step $CSCTR_TEST_KILL_IN_SAVE (after the previous
step was committed), in IteratorHandler.save, which runs inside Orbax's
save before it commits. For tests only; the trainer has no such hook.
"""

import os
import pathlib
import sys

ENV = "CSCTR_TEST_KILL_IN_SAVE"

PROGRAM = r"""
import os, signal
from absl import app
from etils import epath
from csctr import main
from csctr.training import checkpointing
step = os.environ["CSCTR_TEST_KILL_IN_SAVE"]
save = checkpointing.IteratorHandler.save
def killing_save(self, directory, *args, **kwargs):
  # directory is <root>/<step>[.orbax-checkpoint-tmp*]/data.
  if epath.Path(directory).parent.name.split(".")[0] == step:
    os.kill(os.getpid(), signal.SIGKILL)
  return save(self, directory, *args, **kwargs)
checkpointing.IteratorHandler.save = killing_save
app.run(main.main)
"""


def command(*args: str) -> list[str]:
  """The training command line with ARGS (as for python -m csctr.main)."""
  return [sys.executable, "-c", PROGRAM, *args]


def python_for_launcher(directory: pathlib.Path) -> str:
  """A $PYTHON for launch/local_multiprocess.sh that runs PROGRAM instead
  of `-m csctr.main`."""
  path = directory / "python"
  path.write_text(
      "#!/usr/bin/env bash\n"
      '[[ "$1 $2" == "-m csctr.main" ]] && shift 2\n'
      f'exec {sys.executable} -c "$(cat {directory / "program.py"})" "$@"\n')
  (directory / "program.py").write_text(PROGRAM)
  path.chmod(0o755)
  return str(path)
