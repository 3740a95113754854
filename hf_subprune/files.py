"""Names of the files hf_subprune writes next to a model (one place, read by the writers and the readers)."""

REPORT_FILE = "subprune_report.json"
"""Everything about the run (``PruneResult.report``): the card is rebuilt from it alone."""

CONFIG_FILE = "subprune_config.json"
"""The ``PruneConfig`` as run, next to the weights as ``config.json`` is for transformers."""

CALIBRATION_FILE = "calibration_ids.safetensors"
"""The calibration token ids (``input_ids``, as given to the cut), so that a recovery can train on exactly them."""
