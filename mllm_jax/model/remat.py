"""Rematerialisation policies of the decoder layers, by name.

A policy decides which values computed inside a layer's forward pass are kept for the
backward pass; everything else is recomputed there. Names (the `remat` of `Qwen2Config`,
of a model call and of the train config):

  "none"                              keep every activation (no remat region)
  "full"                              keep only each layer's inputs; recompute the rest
  "dots_saveable"                     keep every matmul output, recompute the elementwise
                                      work (norms, RoPE, SiLU, softmax)
  "dots_with_no_batch_dims_saveable"  keep the projections' outputs (dots without batch
                                      dims), recompute attention's batched score / PV dots
  "nothing_saveable"                  same memory as "full" (kept for symmetry with jax)

`True` / `False` mean "full" / "none" (the older boolean flag).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}
REMAT_NAMES = ("none", *REMAT_POLICIES)


def remat_name(value: bool | str) -> str:
    """The policy name of a `remat` setting (True -> "full", False -> "none")."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in REMAT_NAMES:
        raise ValueError(f"remat {value!r} is not one of {REMAT_NAMES} (or True / False)")
    return value


def remat_layer(fn: Callable, value: bool | str) -> Callable:
    """`fn` (a layer call) wrapped in `nnx.remat` with the named policy, or `fn` itself
    for "none"."""
    from flax import nnx

    name = remat_name(value)
    if name == "none":
        return fn
    return nnx.remat(fn, policy=REMAT_POLICIES[name])
