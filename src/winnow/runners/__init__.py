"""Ways to run the same pipeline wider than one process.

:mod:`winnow.runners.ray` puts engine (and reward-model) replicas on a Ray cluster as actors behind
the Engine and Reward contracts; the pipeline stays one process that reads the data and writes the
output. Nothing here is imported unless a run asks for it (``--ray true``).
"""
