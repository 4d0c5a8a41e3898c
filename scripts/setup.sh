#!/usr/bin/env bash
# Installs what a fresh machine lacks; quick no-op where everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y mosquitto >/dev/null 2>&1 \
    || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y mosquitto >/dev/null; }
fi
if ! python -m pip show -q inspection-agent >/dev/null 2>&1 \
   || ! python -c "import torch, onnxruntime, openvino, nncf, cv2, paho.mqtt, scipy, sklearn, pytest" >/dev/null 2>&1; then
  # torch first, the local CPU build: a plain requirement would pull several GB of CUDA packages.
  python -m pip install -q torch==2.13.0
  python -m pip install -q -e ".[test]"
fi
