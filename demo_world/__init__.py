"""The demo world's reproduction and report scripts, kept out of the installed package.

The package ships what a user needs by name (``winnow.demo``: the trained weights, the datasets, the
arithmetic task and its checker, the tiny-model builder behind ``demo-tiny``); this folder holds how
they were made and the demo report, run from a checkout's root:

    python -m demo_world.train --all       # rebuild data, tokenizer, policy, PRM and RM (seeded, ~40 min)
    python -m demo_world.report            # the best-of-N table of the README (what scripts/demo.sh runs)
"""
