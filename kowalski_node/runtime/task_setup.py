"""A task's tools from settings: the sandbox's limits and the RLM loop's config.

One place for "settings -> config", shared by the Python API's local executor and the
node's runtime (which therefore does not import the user-facing `api` module).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from kowalski_node.config import Settings
from kowalski_node.llm.factory import Backends
from kowalski_node.repl.base import ReplExecutor

if TYPE_CHECKING:
    from kowalski_node.repl.config import SandboxConfig
    from kowalski_node.rlm.config import RlmConfig


def sandbox_config_from(settings: Settings) -> SandboxConfig:
    """The sandbox limits from `settings.sandbox`; the node's own directories are hidden."""
    from kowalski_node.repl import SandboxConfig

    sandbox = settings.sandbox
    return SandboxConfig(
        pool_size=sandbox.pool_size,
        memory_mb=sandbox.memory_mb,
        cpu_s=sandbox.cpu_s,
        cpu_total_s=max(3600, math.ceil(sandbox.cpu_s)),
        max_procs=sandbox.max_procs,
        file_size_mb=sandbox.file_size_mb,
        workdir_mb=sandbox.workdir_mb,
        require=frozenset(sandbox.require),
        expose_paths=tuple(sandbox.expose_paths),
        hide_paths=tuple(
            sorted({str(settings.paths.home.expanduser()), str(settings.node_data_dir)})
        ),
    )


def sandbox_languages_for(settings: Settings) -> tuple[str, ...]:
    """The languages the sandbox will offer under `settings`, before any worker starts."""
    from kowalski_node.repl.lazy import sandbox_languages

    return sandbox_languages(sandbox_config_from(settings))


async def open_sandbox_repl(settings: Settings) -> ReplExecutor:
    """The started sandbox (`SubprocessReplExecutor`) with limits from `settings.sandbox`.

    The node's own directories (home, node data with its keys) are hidden from code.
    """
    from kowalski_node.repl import SubprocessReplExecutor

    config = sandbox_config_from(settings)
    repl = SubprocessReplExecutor(config)
    await repl.start()
    return repl


FINAL_TURN_SHARE = 0.25  # at most this share of a time budget is kept for the final answer


def split_time_budget(budget_s: float | None) -> tuple[float | None, float]:
    """(budget for the loop, bound of the final-answer turn) so that both fit in `budget_s`.

    When the budget runs out the runner asks the model once more for a final answer,
    bounded by `final_grace_s` (30 s). Counted on top of the budget, that made a 90 s
    budget take 120 s; here the final turn's time is reserved inside the budget
    (min(30 s, a quarter of it)), so a run ends within its budget plus scheduling noise.
    """
    from kowalski_node.rlm.config import RlmConfig

    grace = RlmConfig.final_grace_s
    if budget_s is None:
        return None, grace
    reserve = min(grace, budget_s * FINAL_TURN_SHARE)
    return budget_s - reserve, reserve


def rlm_config_from(settings: Settings, backends: Backends) -> RlmConfig:
    """The RLM runner's per-task config, from settings (the single source of defaults)."""
    from kowalski_node.rlm.config import RlmConfig

    rlm, llm = settings.rlm, settings.llm
    loop_budget, final_grace = split_time_budget(rlm.time_budget_s)
    return RlmConfig(
        max_iterations=rlm.max_iterations,
        max_depth=rlm.max_depth,
        block_timeout_s=rlm.block_timeout_s,
        time_budget_s=loop_budget,
        final_grace_s=final_grace,
        token_budget=rlm.token_budget,
        max_errors=rlm.max_errors,
        max_output_chars=rlm.output_limit_chars,
        sub_concurrency=rlm.sub_concurrency,
        system_prompt=rlm.system_prompt,
        worked_examples=rlm.worked_examples,
        context_preview_chars=rlm.context_preview_chars,
        answer_after_code=rlm.answer_after_code,
        code_prefill=rlm.code_prefill,
        root_model=backends.root_model,
        sub_model=backends.sub_model,
        max_tokens=llm.max_tokens,
        sub_max_tokens=llm.sub_max_tokens,
        temperature=llm.temperature,
        llm_timeout_s=llm.request_timeout_s,
        llm_retries=llm.retries,
        retry_backoff_s=llm.retry_backoff_s,
    )
