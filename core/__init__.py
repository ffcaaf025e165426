"""What every layer shares, and nothing else: the user-error type, devices and precisions, and
process-level set-up (seeding, cache and run folders, atomic writes).

The layers read top-down in the folders: ``run.py`` -> ``jobs/`` -> ``relaxflow/``, ``cfd/`` ->
``guidance/`` -> ``core/``. Nothing here imports another package of the project.
"""
