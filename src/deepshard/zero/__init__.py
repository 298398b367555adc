"""ZeRO: sharded parameters, gradients and optimizer state (stage 0 = plain data parallelism).

Stage-3 user API (DeepSpeed's names): :class:`GatheredParameters`, :func:`register_external_parameter`,
:func:`set_z3_leaf_modules`, :class:`Init`, plus :func:`set_unit_modules` and :func:`full_state_dict`.
"""

from deepshard.zero.gathered import GatheredParameters, full_state_dict
from deepshard.zero.init import Init
from deepshard.zero.units import (
    get_z3_leaf_modules,
    register_external_parameter,
    set_unit_modules,
    set_z3_leaf_modules,
    unregister_external_parameter,
    unset_z3_leaf_modules,
    z3_leaf_module,
)
from deepshard.zero.watchdog import CollectiveDivergedError, CollectiveTimeoutError

__all__ = [
    "CollectiveDivergedError",
    "CollectiveTimeoutError",
    "GatheredParameters",
    "Init",
    "full_state_dict",
    "get_z3_leaf_modules",
    "register_external_parameter",
    "set_unit_modules",
    "set_z3_leaf_modules",
    "unregister_external_parameter",
    "unset_z3_leaf_modules",
    "z3_leaf_module",
]
