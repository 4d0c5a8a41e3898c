#!/usr/bin/env bash
# Installs what a fresh machine lacks; quick no-op where everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
apt_install() {  # the package lists are updated only when an install fails without it
  $SUDO apt-get install -y "$@" >/dev/null 2>&1 \
    || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y "$@" >/dev/null; }
}

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  apt_install mosquitto
fi
# The live page's test loads it in a headless browser (and skips, saying so, without one).
if command -v apt-get >/dev/null 2>&1 && ! command -v chromium >/dev/null 2>&1 \
   && ! command -v chromium-browser >/dev/null 2>&1 && ! command -v google-chrome >/dev/null 2>&1; then
  apt_install chromium
fi
if ! python -m pip show -q inspection-agent >/dev/null 2>&1 \
   || ! python -c "import torch, onnxruntime, openvino, nncf, cv2, paho.mqtt, scipy, sklearn, pytest, prometheus_client, google.protobuf, asyncua" >/dev/null 2>&1; then
  # torch first, the local CPU build: a plain requirement would pull several GB of CUDA packages.
  python -m pip install -q torch==2.13.0
  python -m pip install -q -e ".[test]"
fi
# The Sparkplug tests' independent host application (mqtt-spb-wrapper) pins paho-mqtt 1.x, which the
# agent (paho-mqtt 2.x) cannot share: it gets an environment of its own (tests/test_sparkplug.py).
if [ ! -x .venv-sparkplug-host/bin/python ] \
   || ! .venv-sparkplug-host/bin/python -c "import mqtt_spb_wrapper" >/dev/null 2>&1; then
  python -m venv .venv-sparkplug-host
  .venv-sparkplug-host/bin/python -m pip install -q "mqtt-spb-wrapper==2.1.2"
fi
# OpenCV 5 keeps AKAZE and BRISK in the contrib wheel. The main wheel (an older install of this
# project) writes the same cv2 package and hides them: it goes, and contrib is written again.
if ! python -c "import cv2; f = getattr(cv2, 'xfeatures2d', cv2); f.AKAZE_create; f.BRISK_create" >/dev/null 2>&1; then
  python -m pip uninstall -q -y opencv-python-headless >/dev/null 2>&1 || true
  python -m pip install -q --force-reinstall --no-deps "opencv-contrib-python-headless>=4.9"
fi
