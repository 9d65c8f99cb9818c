"""Homomorphic aggregation with TenSEAL (CKKS and BFV)."""
