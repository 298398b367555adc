"""``import deepspeed`` in a script started with ``deepshard --as_deepspeed``: hand over to deepshard.

The launcher puts this directory first on the script's ``PYTHONPATH``. Importing this package turns on
deepshard's alias (:func:`deepshard.compat.install`) and replaces itself with the module the alias
serves, so that ``deepspeed`` and every ``deepspeed.<path>`` resolve to deepshard.
"""

import importlib
import sys

del sys.modules["deepspeed"]  # this stand-in; install() refuses a foreign 'deepspeed' module
importlib.import_module("deepshard.compat").install()
sys.modules["deepspeed"] = importlib.import_module("deepspeed")
