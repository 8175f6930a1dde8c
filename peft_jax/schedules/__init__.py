"""Schedules: state updates between training steps, for methods that change shape.

Each factory takes a tree-level adapter (``by_rules``) and returns a
``peft_jax.Schedule`` governing the leaves of one method, found by the leaf
adapter's canonical name, so rules may mix methods. Pass the schedule to
``TrainState.create(..., schedule=, frozen=)`` and ``make_train_step(...,
schedule=)``.

* ``adalora_schedule``: AdaLoRA's importance-driven rank budget (masks ``e``).
* ``lora_dash_schedule``: LoRA-Dash's direction selection after pre-launch.
* ``flexlora_schedule``: FlexLoRA's entropy-guided prune/grow, keeping the
  optimizer state.
"""

from peft_jax.schedules.adalora import adalora_schedule as adalora_schedule
from peft_jax.schedules.flexlora import flexlora_schedule as flexlora_schedule
from peft_jax.schedules.lora_dash import lora_dash_schedule as lora_dash_schedule
