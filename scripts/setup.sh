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
# OpenCV 5 keeps AKAZE and BRISK in the contrib wheel. The main wheel (an older install of this
# project) writes the same cv2 package and hides them: it goes, and contrib is written again.
if ! python -c "import cv2; f = getattr(cv2, 'xfeatures2d', cv2); f.AKAZE_create; f.BRISK_create" >/dev/null 2>&1; then
  python -m pip uninstall -q -y opencv-python-headless >/dev/null 2>&1 || true
  python -m pip install -q --force-reinstall --no-deps "opencv-contrib-python-headless>=4.9"
fi
