"""Tasks (what is learned). Importing this package registers them all; a new task is one file
here that calls ``register`` and one line below."""

from tunesmith.tasks import classify, distill, dpo, grpo, ppo, reward, sft  # noqa: F401  (registration)
from tunesmith.tasks.base import (
    TASKS,
    Context,
    Task,
    get_task,
    matrix_markdown,
    register,
    task_names,
)

__all__ = ["TASKS", "Context", "Task", "get_task", "matrix_markdown", "register", "task_names"]
