"""MInference-compatible API and transformers-version shims."""
