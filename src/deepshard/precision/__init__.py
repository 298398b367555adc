"""Mixed precision: the dtype policy, the loss scaler and fp32 master weights."""

from deepshard.precision.loss_scaler import LossScaleAtMinimumError, LossScaler
from deepshard.precision.master import MasterWeights
from deepshard.precision.policy import PrecisionPolicy, dtype_from_name, loss_scaler_from_config

__all__ = [
    "LossScaleAtMinimumError",
    "LossScaler",
    "MasterWeights",
    "PrecisionPolicy",
    "dtype_from_name",
    "loss_scaler_from_config",
]
