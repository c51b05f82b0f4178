"""Tasks: loss and metrics for each kind of training; importing registers the built-in ones."""
from zoo.tasks import classification, diffusion, lm, sequence_classification  # noqa: F401  (registration side effects)
from zoo.tasks.base import TASKS, Task, create_task, list_tasks, register_task

__all__ = ["TASKS", "Task", "create_task", "list_tasks", "register_task"]
