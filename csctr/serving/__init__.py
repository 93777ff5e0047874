"""Online serving: offline visual-embedding tables and the jitted scorer.

`from csctr import serving; serving.Scorer.from_workdir(...)`. Nothing here
imports the training stack (Grain, TFDS, optax, tensorboardX).
"""

from csctr.serving.scorer import FALLBACKS
from csctr.serving.scorer import Scorer
from csctr.serving.scorer import ServingConfig
from csctr.serving.cpu import configure_cpu_serving
