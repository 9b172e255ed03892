"""Synthetic classification tasks from structural causal models (the TabICL v1 prior) in JAX."""
