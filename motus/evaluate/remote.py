"""The closed loop through a deployed policy server (`motus evaluate --via-server URL`): the client side of
`motus serve`'s API, so what the gate measures is what a robot talking to the deployment would get.

The server answers each plan with the noise seed the in-process evaluation would use (`ModelPolicy.noise_key`),
so on the same device and the same version the actions, and the success, are the in-process ones. Before any
rollout the server's `/metadata` must name the export being evaluated (its export hash): an evaluation through
a server that serves another version would be recorded against the wrong one.
"""

from __future__ import annotations

import base64
import http.client
import json
import urllib.parse
from typing import Any

import numpy as np


def encode_image(image: np.ndarray) -> dict[str, Any]:
    """A uint8 image in the compact JSON form `motus serve` accepts: shape, dtype and the raw bytes in base64."""
    a = np.ascontiguousarray(image, dtype=np.uint8)
    return {"shape": list(a.shape), "dtype": "uint8", "b64": base64.b64encode(a.tobytes()).decode()}


class ServerError(RuntimeError):
    """The policy server refused or failed a request; the message has its status and its error."""


class PolicyClient:
    """A keep-alive HTTP connection to a policy server."""

    def __init__(self, url: str, timeout: float = 60.0):
        u = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"policy server URL '{url}': expected http://HOST:PORT")
        self.url, self.host, self.port, self.timeout = url, u.hostname, u.port or 80, timeout
        self._conn: http.client.HTTPConnection | None = None

    def _request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        for attempt in (0, 1):  # a kept-alive connection the server closed is opened again, once
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
                r = self._conn.getresponse()
                payload = r.read()
                return r.status, json.loads(payload) if payload else None
            except (http.client.HTTPException, ConnectionError) as e:
                self.close()
                if attempt:
                    raise ServerError(f"{self.url}{path}: {type(e).__name__}: {e}") from None
            except OSError as e:
                self.close()
                raise ServerError(f"{self.url}{path}: {e}") from None
        raise AssertionError("unreachable")

    def metadata(self) -> dict[str, Any]:
        status, body = self._request("GET", "/metadata")
        if status != 200:
            raise ServerError(f"{self.url}/metadata answered {status}: {body}")
        return body

    def act(self, request: dict[str, Any]) -> dict[str, Any]:
        status, body = self._request("POST", "/act", request)
        if status != 200:
            raise ServerError(f"{self.url}/act answered {status}: {(body or {}).get('error', body)}")
        return body

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def check_serves(client: PolicyClient, export_hash: str) -> dict[str, Any]:
    """The server's metadata, when it serves the export of this hash; ServerError naming both otherwise."""
    meta = client.metadata()
    serving = meta.get("serving") or {}
    if serving.get("export_hash") != export_hash:
        got = (f"{serving.get('name')} v{serving.get('version')} (export {str(serving.get('export_hash'))[:12]})"
               if serving else "nothing")
        raise ServerError(f"{client.url} serves {got}, not the export being evaluated ({export_hash[:12]}): the "
                          "evaluation would be recorded against the wrong version")
    return meta


class RemotePolicy:
    """`ModelPolicy`'s plans, asked of a policy server: same observation, same noise key, same chunk."""

    needs_frame = True

    def __init__(self, client: PolicyClient, local: Any):
        self.client, self.local = client, local  # local: the ModelPolicy whose noise keys and setup are used

    @property
    def plans(self) -> int:
        return self.local.plans

    def chunk(self, frame: np.ndarray, qpos: np.ndarray) -> np.ndarray:
        lp = self.local
        body = {"image": encode_image(frame), "state": np.asarray(qpos, dtype=np.float64).tolist(),
                "instruction": lp.setup.instruction, "tier": lp.setup.tier, "mode": lp.mode,
                "seed": lp.noise_key()}
        if lp.sample_steps is not None:
            body["steps"] = lp.sample_steps
        answer = self.client.act(body)
        lp.plans += 1
        return np.asarray(answer["actions"], dtype=np.float64)

    def plan(self, frame, qpos, sim) -> np.ndarray:
        return np.repeat(self.chunk(frame, qpos), self.local.exported.spec.downsample, axis=0)
