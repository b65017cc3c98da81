"""lm-evaluation-harness integration: the `mee` model adapter, its import hook, the task catalogue and YAMLs."""
