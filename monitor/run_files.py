"""Names of the files of a run folder (`simulate --out`) that the exporters read as well as the simulator.

Their home is here, below both: the simulator writes them, the MLflow exporter copies and plots them.
"""

CONFIG = "config.json"  # the run's settings as given: what --resume compares (a sweep's folder has its own)
SUMMARY = "summary.json"  # written when the run ends
ROUNDS = "rounds.jsonl"  # one line per probe round
