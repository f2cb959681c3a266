"""Tags the MLflow exporter sets on a run at its end, which `simulate compare` reads back.

Their own module so that compare reads them without importing the exporters (and torch with them).
"""

STOPPED_TAG = "editwatch.stopped"  # why the run ended: end of stream, limit, interrupted, ...
COLLAPSE_TAG = "editwatch.collapse"  # whether the collapse alarm was raised
COLLAPSE_AT_TAG = "editwatch.collapse_first_at"  # edits applied at the first collapse alarm (compare's column)
FORGETTING_TAG = "editwatch.forgetting"  # whether significant forgetting was detected
LIMIT_TAG = "editwatch.limit"  # the --limit the run ended under: a resume may raise it, a param keeps its first value
