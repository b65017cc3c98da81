"""Paired timing: speedups that survive a busy machine (`statistics`: the speedup and its interval;
`pairing`: interleaving the two decodes; `load`: what else the machine ran). Torch-free but for
`pairing`, which drives the engine's step generators.

The baseline (`full`) and the candidate decode the same blocks of work in the same process,
alternating which goes first, or in lockstep (step generators advanced in turn, one generated
token each), so the machine's drift lands on both alike. The speedup is the ratio of time per
unit of work with a timing-noise interval from blocks timed more than once, re-timed until it
is as narrow as asked or the allowance is spent. docs/TIMING.md explains the method once.
"""
