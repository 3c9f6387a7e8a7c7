"""Sandboxed code execution for RLM blocks (see `base.ReplExecutor`)."""
