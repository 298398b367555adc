"""``python -m deepshard.compat``: print the directory that makes ``import deepspeed`` resolve to deepshard.

Put it first on ``PYTHONPATH`` for launchers other than deepshard's, for example
``PYTHONPATH=$(python -m deepshard.compat) accelerate launch --use_deepspeed train.py``.
"""

from __future__ import annotations

import sys

from deepshard.compat import ALIAS_PATH

if __name__ == "__main__":
    sys.stdout.write(f"{ALIAS_PATH}\n")
