"""SCBench-style shared-context evaluation (Li et al., 2024, "SCBench: A KV Cache-Centric Analysis of
Long-Context Methods", arXiv:2412.10319): the 12 tasks, their metrics, offline generators for the
synthetic ones, multi-turn and multi-request runs of any method, and ``flexinference eval``.

Example::

    from flexinference.scbench import Runner, build_method, generate_records
    records = generate_records("scbench_kv", tokenizer=tok, num_records=2, context_tokens=8192)
    result = Runner(model, tok).run("scbench_kv", records, build_method("dense"), mode="multi_turn")
    print(result.score, result.stats.prefill_calls)
"""

from flexinference.scbench.data import Record, Turn, load_hub, load_records, parse_record, save_records
from flexinference.scbench.embedded import EMBEDDED_NOTE, CharTokenizer, build_embedded_model
from flexinference.scbench.generators import count_tokens, generate_records
from flexinference.scbench.methods import (
    METHODS,
    Method,
    MethodUnavailableError,
    Patch,
    PatternPrefill,
    build_method,
    register_method,
)
from flexinference.scbench.metrics import aggregate, score_turn
from flexinference.scbench.runner import MODES, CallStats, RecordResult, Runner, TaskResult, TurnResult
from flexinference.scbench.tasks import SYNTHETIC_TASKS, TASK_NAMES, TASKS, Task, get_task

__all__ = [
    "EMBEDDED_NOTE",
    "METHODS",
    "MODES",
    "SYNTHETIC_TASKS",
    "TASKS",
    "TASK_NAMES",
    "CallStats",
    "CharTokenizer",
    "Method",
    "MethodUnavailableError",
    "Patch",
    "PatternPrefill",
    "Record",
    "RecordResult",
    "Runner",
    "Task",
    "TaskResult",
    "Turn",
    "TurnResult",
    "aggregate",
    "build_embedded_model",
    "build_method",
    "count_tokens",
    "generate_records",
    "get_task",
    "load_hub",
    "load_records",
    "parse_record",
    "register_method",
    "save_records",
    "score_turn",
]
