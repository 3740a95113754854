"""Modeling files that the heterogeneous export writes next to the weights (as ``modeling_subprune.py``).

Each file is self-contained (torch and transformers only): it runs from the saved folder through ``auto_map``
and ``trust_remote_code=True``, where hf_subprune need not be installed. It subclasses the stock classes and
resizes each layer to its ``per_layer_config`` widths; no modeling code is copied. The export writes the
pruned model's ``model_type`` into the ``STOCK_MODEL_TYPE`` line.
"""
