"""The ``harmonize`` command: ``one``, ``validate``, ``plan``, ``run``, ``report``, ``serve``, ``deploy``, ``worker``,
``demo``.

``main`` (the parser and the entry point ``harmonize = flows.cli.main:main``) mounts one module per group of
subcommands: ``one`` (a single item with the core alone, no orchestration), ``review`` (``validate``, ``plan`` and
``report``: they read and compute nothing), ``run`` (the manifest flow in this process or on a pool), ``fleet``
(``serve``, ``deploy``, ``worker``) and ``demo``; ``common`` holds what they share (run flags, paths, exit codes).
Each module imports Prefect, torch and the flows only inside the command that needs them (start-up time:
``harmonize validate`` stays free of Prefect).

Exit codes: 0 success; 1 some items failed or some manifest rows are invalid; 2 a problem for the user to fix
(unreadable manifest, missing columns, bad flag value, weights unavailable), printed as one line without a
traceback; 130 interrupted by Ctrl-C (one line). ``run`` and ``demo`` use Prefect's local ephemeral API (no server
needed); Prefect's console logging is quiet unless ``--verbose``, and the pipeline's own progress lines (per item and
stage) are printed instead.
"""
