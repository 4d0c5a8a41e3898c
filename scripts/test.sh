#!/usr/bin/env bash
# The test command: installs what is missing, then runs the whole suite (CPU only; GPU and
# ../shared/data tests skip with a reason where those are absent).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m pytest -q "$@"
