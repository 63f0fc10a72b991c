"""Whether a started vLLM engine is dead: the one place that reads vLLM's death signals.

vLLM's AsyncLLM runs its engine core in child processes. When one dies (kill -9, the OOM killer,
a crash), vLLM's own monitor thread sees the process's sentinel, marks the client dead and shuts
it down: `AsyncLLM.errored` turns true and requests in flight fail with EngineDeadError (its
output handler propagates the error). `death_of` reads both signals, the core processes'
sentinels first (the more precise reason), without reaping them (vLLM's monitor does) and
without blocking: `VllmEngine.wait_dead` polls it every DEATH_POLL_S on the event loop.

    why = death_of(async_llm)   # "" while it lives
"""

from __future__ import annotations

import multiprocessing.connection

# How often the death watcher looks at the engine: health turns NOT_SERVING within this of the
# engine core's death (plus vLLM's own detection, immediate on the process's exit).
DEATH_POLL_S = 0.1


def death_of(engine) -> str:
    """Why this AsyncLLM is dead, "" while it lives: an engine core process exited, or AsyncLLM
    says it errored (vLLM's monitor saw a core go, or its output handler failed)."""
    exited = [p for p in core_processes(engine) if _exited(p)]
    if exited:
        return "the engine core process exited (" + ", ".join(f"{p.name} pid {p.pid}" for p in exited) + ")"
    if engine.errored:
        return "the vLLM engine errored (EngineDeadError)"
    return ""


def core_processes(engine) -> list:
    """The multiprocessing.Process objects of AsyncLLM's engine cores ([] when vLLM runs the core
    in this process, VLLM_ENABLE_V1_MULTIPROCESSING=0, or an attribute moved in another vLLM)."""
    resources = getattr(getattr(engine, "engine_core", None), "resources", None)
    return list(getattr(getattr(resources, "engine_manager", None), "processes", None) or ())


def _exited(process) -> bool:
    """Whether a multiprocessing.Process has exited, read on its sentinel: no waitpid, so it
    does not race vLLM's monitor thread, which reaps it (and may close it: closed = exited)."""
    try:
        return bool(multiprocessing.connection.wait([process.sentinel], timeout=0))
    except (ValueError, OSError):
        return True
