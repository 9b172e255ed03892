"""The `mllm-jax` command line: one sub-command per pipeline stage.

Each command imports its stage lazily so that `mllm-jax --help` stays fast and a stage's
heavy dependencies load only when that stage runs.
"""

from __future__ import annotations

import typer

from mllm_jax import __version__

app = typer.Typer(
    name="mllm-jax",
    help="MachineLearningLM in JAX: generate synthetic tasks, train, export, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"mllm-jax {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """MachineLearningLM in JAX."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
