"""The ``[api]`` section of the node's config, checked before the node starts."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from protocol import errors
from protocol.errors import AemError

MAX_TOKEN_LEN = 512


@dataclass(frozen=True)
class ApiSettings:
    enabled: bool
    host: str
    port: int
    token: str
    max_price: int          # micro-credits: the price limit when a request names none

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) -> (host, port). Port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise AemError(errors.CONFIG, f"api.listen must be HOST:PORT, e.g. 127.0.0.1:8411, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise AemError(errors.CONFIG, f"api.listen: {host!r} is not an IP address (or localhost)") from None
    return host, int(port)


def api_settings(cfg: dict) -> ApiSettings:
    """The API's settings from a loaded config; CONFIG errors name the key.

    A bearer token is required whenever the API listens beyond loopback: the
    API spends this node's credits, so an open port on a LAN or the internet
    without one would let anyone who reaches it spend them."""
    from aemd.cmd_genesis import parse_credits
    a = cfg["api"]
    host, port = parse_listen(a["listen"])
    token = a["token"]
    if len(token) > MAX_TOKEN_LEN or any(c.isspace() or not c.isprintable() for c in token):
        raise AemError(errors.CONFIG, f"api.token must be at most {MAX_TOKEN_LEN} printable characters without spaces")
    try:
        max_price = parse_credits(a["max_price"])
    except AemError as exc:
        raise AemError(errors.CONFIG, f"api.max_price: {exc.detail}") from None
    s = ApiSettings(enabled=a["enabled"], host=host, port=port, token=token, max_price=max_price)
    if s.enabled and not s.loopback and not token:
        raise AemError(errors.CONFIG, f"api.listen {a['listen']} is not a loopback address: set api.token "
                                      "(a bearer token every request must carry), or listen on 127.0.0.1")
    return s
