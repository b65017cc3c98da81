"""The hot path: a model runner per family, confidence measures, exit heads, the policy and the decoding loop.

Uses nothing else in mee-bench; every other package builds on it.
"""
