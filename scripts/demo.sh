#!/usr/bin/env bash
# The main job: installs what is missing, then runs the demo (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m agent.demo "$@"
