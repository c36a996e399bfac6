"""aem errors in OpenAI's error shape, with an HTTP status that fits.

Body: ``{"error": {"message": DETAIL, "type": TYPE, "code": AEM_CODE, "param": null}}``.
``code`` is always the stable aem error code (``NOT_FOUND``, ``REFUSED``...),
so a client branches on it exactly as ``aemctl`` users branch on
``error: CODE: detail``.
"""

from __future__ import annotations

from protocol import errors
from protocol.errors import AemError

# Funds: the payer cannot afford the cheapest host (a REFUSED that the API
# re-checks against its own replay, see openai_routes).
INSUFFICIENT_FUNDS = 402

_STATUS = {
    errors.NOT_FOUND: 404,
    errors.UNAVAILABLE: 503,
    errors.TIMEOUT: 504,
    errors.REFUSED: 403,
    errors.TOO_LARGE: 413,
    errors.CONFIG: 500,
    errors.STORE: 500,
}
_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_funds",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


def http_status(code: str) -> int:
    """Bad input of any kind (decoding, schema, values) is a 400."""
    return _STATUS.get(code, 400)


def error_body(status: int, code: str, message: str) -> dict:
    return {"error": {"message": message, "type": _TYPE.get(status, "server_error"), "code": code,
                      "param": None}}


def from_aem(exc: AemError, status: int | None = None) -> tuple[int, dict]:
    st = status or http_status(exc.code)
    return st, error_body(st, exc.code, exc.detail or exc.code)
