"""The ``deepshard`` launcher: DeepSpeed's flags and hostfile over torch's elastic agent, and the report.

Modules: :mod:`.cli` (command dispatch), :mod:`.launch` (flags to plan), :mod:`.hostfile`,
:mod:`.runners` (per-host command lines), :mod:`.supervise` (run and tear down), :mod:`.node` (the
per-node agent), :mod:`.rank` (the per-rank shim), :mod:`.report` (environment report).
"""
