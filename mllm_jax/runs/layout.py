"""Where a training run keeps what: the run directory's layout.

    config.yaml       the resolved config (`CONFIG_FILE`)
    base/, base.json  the random-init base as an HF checkpoint (when model.base is None)
    checkpoints/      orbax steps (newest `checkpoint.keep`), unless `checkpoint.directory`
    best/             the best validation step's trainable parameters
    metrics.jsonl     one JSON object per logged step / validation (`METRICS_FILE`)

`train` writes it, `export`, `infer` and `mllm-jax runs show` read it; all of them take
the names from here.
"""

from __future__ import annotations

from pathlib import Path

from mllm_jax.foundation.config import ConfigError
from mllm_jax.runs.config import TrainConfig

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
BASE_DIR = "base"
BASE_RECORD = "base.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"


def checkpoints_dir(config: TrainConfig, run_dir: Path) -> str:
    """The absolute directory of the run's orbax steps."""
    return config.checkpoint.directory or str((run_dir / CHECKPOINTS_DIR).absolute())


def best_dir(run_dir: Path) -> str:
    """The absolute directory of the best validation step."""
    return str((run_dir / BEST_DIR).absolute())


def make_run_dir(run_dir: Path) -> None:
    """Creates the run directory; a place that is a file, lies below a file or cannot be
    written is a ConfigError naming it (were tracebacks from mkdir)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"run_dir {run_dir} is a file, not a directory") from None
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError(f"run_dir {run_dir}: cannot create the directory ({reason})") from None
