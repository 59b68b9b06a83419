"""A hub model is fetched (or refused) once, on the driver, before any work: a gated
model fails naming the config key and HF_TOKEN. The hub is a real HTTP server on
127.0.0.1 answering as the Hub does for a gated repository (no network here)."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
from qpo_ray.backends import check_model
from qpo_ray.common.errors import ConfigError
try:
    check_model("some-org/gated-model", "target.model")
except ConfigError as exc:
    print("ERROR " + str(exc))
"""


class _GatedHub(http.server.BaseHTTPRequestHandler):
    def _gated(self):
        body = json.dumps({"error": "Access to model some-org/gated-model is restricted."})
        self.send_response(401)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to model some-org/gated-model is restricted.")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body.encode())

    do_GET = do_HEAD = _gated

    def log_message(self, *args):
        pass


def test_a_gated_hub_model_fails_before_work_naming_hf_token(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
        env.update(PYTHONPATH=str(REPO), HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}",
                   HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
        proc = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ERROR target.model: 'some-org/gated-model' could not be "
                                  "fetched"), proc.stdout
    assert "gated" in proc.stdout and "HF_TOKEN" in proc.stdout
