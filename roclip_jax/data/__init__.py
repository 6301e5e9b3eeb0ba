"""Input data: tokenizer, demo dataset, sources, image ops, grain pipelines."""
