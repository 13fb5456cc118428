"""Torch model code (tokenizers, quantizers, AR transformer, sampler, metrics); no Dagster imports."""
