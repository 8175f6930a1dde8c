"""Schedules: state updates between training steps, for methods that change shape.

Each schedule lives beside its method (``peft_jax/methods/<method>_schedule.py``)
and governs the leaves whose parameters have its method's type, so rules may
mix methods and wrap them. A factory takes a tree-level adapter
(``by_rules``) and returns a ``peft_jax.Schedule``; pass it to
``TrainState.create(..., schedule=, frozen=)`` and ``make_train_step(...,
schedule=)``.

* ``adalora_schedule``: AdaLoRA's importance-driven rank budget (masks ``e``).
* ``lora_dash_schedule``: LoRA-Dash's direction selection after pre-launch.
* ``flexlora_schedule``: FlexLoRA's entropy-guided prune/grow, keeping the
  optimizer state.
* ``diff_pruning_schedule``: DiffPruning's fixed top-k mask after the burn-in.
* ``child_pruning_schedule``: ChildPruning's periodic top-k projection of Δ.
"""

from peft_jax.methods.adalora_schedule import adalora_schedule as adalora_schedule
from peft_jax.methods.child_pruning_schedule import (
  child_pruning_schedule as child_pruning_schedule,
)
from peft_jax.methods.diff_pruning_schedule import (
  diff_pruning_schedule as diff_pruning_schedule,
)
from peft_jax.methods.flexlora_schedule import flexlora_schedule as flexlora_schedule
from peft_jax.methods.lora_dash_schedule import lora_dash_schedule as lora_dash_schedule
