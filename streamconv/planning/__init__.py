"""The pure planner: checkpoint metadata and options in, a `ConversionPlan` out. No file is read or
written here. Selection and naming (`names`), trainer adapters as data (`trainers/`), transforms as
row maps and pieces (`transforms`), coverage proofs (`coverage`), the user options (`options`), and
the plan itself (`plan`).
"""
