"""What a run leaves behind: the report, the model folder (stock or heterogeneous export, with its remote code),
the model card and its plots, and the push to the Hub. Reads models and reports; never prunes."""
