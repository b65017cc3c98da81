"""The hot path: a model runner per family, confidence measures, exit heads, the policy and the decoding loop.

Uses nothing else in mee-bench; every other package builds on it. Importing the package
registers every model family's runner (one import per family below).
"""

from mee_bench.engine import (  # noqa: F401,E402  (register the decoder-only runners)
    gpt2,
    llama,
    llama_variants,
    t5,  # noqa: F401  (registers the t5 and mt5 runner)
)
