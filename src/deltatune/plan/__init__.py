"""Planning without weights: parameter counts (and later memory/throughput) from a model's config."""
