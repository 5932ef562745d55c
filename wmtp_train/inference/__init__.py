"""Inference: batched generation with a KV cache and self-speculative decoding."""
