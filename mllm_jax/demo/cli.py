"""The body of `mllm-jax demo` (the CLI module only registers it)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

EXIT_OK, EXIT_FAILED_ENTRIES, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def demo_command(
    out: Path, config_path: Path | None, overrides: list[str], *, restart: bool, progress: bool
) -> int:
    """Runs the demo; returns the exit status (0 ok, 1 some evaluation entries failed,
    2 bad config, run directory or corpus (e.g. the filter accepted none of its tasks),
    130 interrupted)."""
    from mllm_jax.data.generate import GenerateError
    from mllm_jax.data.shards import CorpusError
    from mllm_jax.demo.config import load_demo_config
    from mllm_jax.demo.run import RunDirectoryError, run_demo
    from mllm_jax.foundation.config import ConfigError
    from mllm_jax.runs.checkpoint import CheckpointMismatchError

    console = Console()
    try:
        config = load_demo_config(config_path, overrides)
        metrics = run_demo(config, out, restart=restart, console=console, progress=progress)
    except (
        ConfigError,
        RunDirectoryError,
        CheckpointMismatchError,
        GenerateError,
        CorpusError,
    ) as error:
        # On stderr, as every other command's errors (the stage lines go to stdout).
        Console(stderr=True).print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.print(
            f"\n[yellow]interrupted[/]: finished stages and checkpoints in {out} are kept, "
            "nothing half-written; run the same command again to continue.",
            highlight=False,
        )
        return EXIT_INTERRUPTED
    failed = sum(len(g["errors"]) for g in metrics["eval"].values())
    if failed:
        console.print(f"[red]{failed} evaluation entries failed[/] (listed in the summary)")
        return EXIT_FAILED_ENTRIES
    return EXIT_OK
