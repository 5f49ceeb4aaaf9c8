"""Speculative decoding: drafters propose tokens, one target pass verifies them exactly."""
