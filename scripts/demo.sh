#!/usr/bin/env bash
# Set up (if needed) and run winnow's main job offline on the bundled demo world: 8 samples for each
# of 200 arithmetic problems from demo-policy, scored in the same run by the math verifier, the
# demo-prm process reward model and the demo-rm classifier, then the best-of-N table.
# Extra arguments go to `python -m demo_world.report` (e.g. --n 50).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m demo_world.report "$@"
