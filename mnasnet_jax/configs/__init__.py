"""Every job's config, importable from anywhere; configs/<job>.py at the repository root are the
file paths that `--config=` takes (ml_collections loads a config by path), each re-exporting one of
these."""
