"""Speculative decoding: sampling, proposal, verification."""
