"""An independent Sparkplug B host application for the tests: mqtt-spb-wrapper (its own paho 1.x and
protobuf, hence its own virtual environment, made by scripts/setup.sh), not the agent's code.

Usage: ``sparkplug_host.py HOST PORT GROUP``. Prints one JSON line per BIRTH, DATA or DEATH the
library decoded (``{"type", "node", "device", "payload"}``, the payload as the library's dict),
and ``{"type": "ready"}`` once subscribed. Reads commands from stdin: ``rebirth NODE`` sends the
NCMD ``Node Control/Rebirth`` = true through the library.
"""
import json
import sys
import time

from mqtt_spb_wrapper import MqttSpbEntityScada


def emit(topic, payload):
    print(json.dumps({"type": topic.message_type, "node": topic.eon_name, "device": topic.eon_device_name,
                      "payload": payload}, default=str), flush=True)


def main():
    host, port, group = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    scada = MqttSpbEntityScada(group, "test-host", callback_birth=emit, callback_data=emit, callback_death=emit)
    scada.on_connect = lambda rc: print(json.dumps({"type": "ready", "rc": rc}), flush=True)
    while not scada.connect(host, port):
        time.sleep(0.2)
    for line in sys.stdin:
        command, node = line.split()
        if command == "rebirth":
            sent = scada.send_command("Node Control/Rebirth", True, eon_name=node)
            print(json.dumps({"type": "sent", "command": command, "ok": bool(sent)}), flush=True)


if __name__ == "__main__":
    main()
