"""KV-cache policies as transformers Cache subclasses."""
