"""Exit statuses of ``inspection-agent``, the contract systemd's unit is written against.

``OK`` only for a deliberate end: SIGTERM/SIGINT, ``--max-frames`` reached, a batch folder or a
video read to its end. ``CONFIG`` only for configuration, data or bundle errors found before
READY (one line naming file and key): restarting cannot help, so the unit's
``RestartPreventExitStatus=2`` stops there. Anything else is ``FAILURE`` and
``Restart=on-failure`` brings the service back. ``UNAVAILABLE``: ``build-engine`` cannot run
on this machine (no TensorRT, no CUDA device).
"""
OK = 0
FAILURE = 1
CONFIG = 2
UNAVAILABLE = 3
