"""Example pipelines (register one with FLUSHLINE_PIPELINES=examples.MODULE:pipeline)."""
