"""OpenAI-compatible endpoints: ``/v1/models``, ``/v1/chat/completions``,
``/v1/completions``, streamed (server-sent events) and not.

``model`` names a domain of the mesh. Each request becomes one text task
through the node's :class:`~aemd.tasks.TaskService` (``submit``), exactly as
``aemctl submit-task`` does: the router picks the host, the payer signs and
pays, the receipt goes to the log. The aem side of each answer is in the
extension field ``aem`` (see :func:`aem_fields`).

Requests are hostile input: the body is read up to :data:`MAX_BODY` bytes
before it is parsed, every field is type-checked here, and the task's own
schema checks the rest (a BAD_VALUE comes back as a 400).
"""

from __future__ import annotations

import codecs
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse

from aemd.api import errors as api_errors
from aemd.api.views import text_models
from aemd.cliutil import fmt_credits
from protocol import errors
from protocol.errors import AemError
from protocol.task import MAX_PROMPT

if TYPE_CHECKING:
    from aemd.api.app import ApiContext

log = logging.getLogger("aemd.api")

MAX_BODY = 1 << 20              # a request body; prompts are at most 64 KiB anyway
MAX_MESSAGES = 256
MAX_TOKENS = 1 << 16
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# OpenAI request fields that would change the answer's meaning if ignored:
# refused unless they hold their neutral value.
_NEUTRAL = {"n": (None, 1), "best_of": (None, 1), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
            "echo": (None, False), "suffix": (None, ""), "tools": (None, []), "functions": (None, []),
            "tool_choice": (None, "none"), "function_call": (None, "none")}


def bad(detail: str) -> AemError:
    return AemError(errors.BAD_VALUE, detail)


async def read_json(request: Request) -> dict:
    cl = request.headers.get("content-length")
    if cl is not None and (not cl.isdigit() or int(cl) > MAX_BODY):
        raise AemError(errors.TOO_LARGE, f"request body over {MAX_BODY} bytes")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > MAX_BODY:
            raise AemError(errors.TOO_LARGE, f"request body over {MAX_BODY} bytes")
    try:
        obj = json.loads(bytes(buf))
    except (ValueError, RecursionError):
        raise AemError(errors.BAD_ENCODING, "request body is not JSON") from None
    if not isinstance(obj, dict):
        raise AemError(errors.BAD_TYPE, "request body must be a JSON object")
    return obj


def _int(body: dict, name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if type(v) is not int or not lo <= v <= hi:
        raise bad(f"{name} must be an integer from {lo} to {hi}")
    return v


def common_args(ctx: "ApiContext", body: dict) -> dict:
    """The task fields every text request shares."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model must name a domain of the mesh (see GET /v1/models)")
    for name, neutral in _NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise bad(f"{name} is not supported by aem")
    stop = body.get("stop")
    if stop not in (None, [], ""):
        raise bad("stop sequences are not supported by aem (the host stops at the model's end of turn)")
    if body.get("stream") not in (None, True, False):
        raise bad("stream must be true or false")
    mt = _int(body, "max_completion_tokens", 1, MAX_TOKENS)
    if mt is None:
        mt = _int(body, "max_tokens", 1, MAX_TOKENS)
    temp = body.get("temperature")
    if temp is None:
        temp_milli = 0      # aem's default: deterministic, so an answer can be checked by re-running it
    elif type(temp) not in (int, float) or not 0 <= temp <= 2:
        raise bad("temperature must be a number from 0 to 2")
    else:
        temp_milli = round(temp * 1000)
    seed = _int(body, "seed", 0, 2**32 - 1)
    args: dict[str, Any] = {"kind": "text", "domain": model, "max_tokens": mt or 0,
                            "temperature_milli": temp_milli, "seed": seed or 0,
                            "max_price": max_price(ctx, body)}
    tags = body.get("aem_tags")
    if tags is not None:
        if not isinstance(tags, list) or len(tags) > 32 or not all(isinstance(t, str) for t in tags):
            raise bad("aem_tags must be a list of at most 32 strings")
        args["tags"] = list(dict.fromkeys(tags))
    use = body.get("aem_training_use")      # the payer's training-use policy; default: [training] use
    if use is not None:
        if use not in ("allowed", "forbidden"):
            raise bad('aem_training_use must be "allowed" or "forbidden"')
        args["training_use"] = use
    return args


def max_price(ctx: "ApiContext", body: dict) -> int:
    """The request's ``aem_max_price`` (credits, a number or a decimal
    string) or the config's ``api.max_price``; micro-credits."""
    from aemd.cmd_genesis import parse_credits
    v = body.get("aem_max_price")
    if v is None:
        return ctx.settings.max_price
    if type(v) not in (int, float, str) or (isinstance(v, str) and len(v) > 32):
        raise bad("aem_max_price must be a number of credits")
    return parse_credits(repr(v) if isinstance(v, float) else str(v))


def chat_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs or len(msgs) > MAX_MESSAGES:
        raise bad(f"messages must be a list of 1 to {MAX_MESSAGES} messages")
    out, size = [], 0
    for m in msgs:
        if not isinstance(m, dict):
            raise bad("each message must be an object with role and content")
        role = CHAT_ROLES.get(m.get("role"))
        if role is None:
            raise bad(f"message role must be one of {', '.join(sorted(CHAT_ROLES))}")
        content = m.get("content")
        if isinstance(content, list):       # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad("only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad("message content must be a string")
        size += len(content.encode("utf-8", "replace"))
        if size > MAX_PROMPT:
            raise AemError(errors.TOO_LARGE, "messages over 64 KiB in all")
        out.append({"role": role, "content": content})
    return out


def completion_prompt(body: dict) -> str:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1:
        p = p[0]
    if not isinstance(p, str) or not p:
        raise bad("prompt must be a non-empty string (token arrays and batches are not supported)")
    return p


def output_text(res: dict) -> str:
    """The answer as text: the output bytes decoded with invalid UTF-8
    dropped, as llama.cpp's own text and the host's streamed chunks are (a
    model with random or bad weights can emit any bytes; the exact bytes are
    what the receipt's output hash covers)."""
    return bytes(res["output"]).decode("utf-8", "ignore")


def aem_fields(res: dict) -> dict:
    """The extension field ``aem`` of every answer: who served it, for how
    much, and the receipt that records it in the log."""
    return {"task_id": res["task_id"], "host": res["host"], "peer_id": res["peer_id"],
            "price": res["price"], "price_credits": fmt_credits(res["price"]),
            "receipt_id": res["receipt_id"], "attempts": res.get("attempts", 1)}


def finish_reason(res: dict, max_tokens: int) -> str:
    return "length" if max_tokens and res.get("tokens_out", 0) >= max_tokens else "stop"


def usage(res: dict) -> dict:
    # The host reports generated tokens only; the prompt's are not known to the payer.
    n = res.get("tokens_out", 0)
    return {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}


async def check_funds(ctx: "ApiContext", exc: AemError, args: dict) -> AemError | tuple[int, dict]:
    """A REFUSED from submit: 402 when this node cannot pay the cheapest
    host within the price limit (checked against its own replay), else as is."""
    if exc.code != errors.REFUSED:
        return exc
    node = ctx.node
    prices = [h["price"] for m in text_models(node) if m["domain"] == args["domain"]
              for h in m["hosts"] if h["price"] <= args["max_price"]]
    if prices:
        res = await node.store.ledger(node.now())
        avail = res.available(node.key.public)
        if avail < min(prices):
            return api_errors.INSUFFICIENT_FUNDS, api_errors.error_body(
                api_errors.INSUFFICIENT_FUNDS, errors.REFUSED,
                f"not enough credits: {fmt_credits(avail)} available, the cheapest host asks "
                f"{fmt_credits(min(prices))}")
    return exc


async def error_response(ctx: "ApiContext", exc: AemError, args: dict | None = None) -> JSONResponse:
    got = await check_funds(ctx, exc, args) if args else exc
    if isinstance(got, AemError):
        status, body = api_errors.from_aem(got)
    else:
        status, body = got
    return JSONResponse(body, status_code=status)


# -- endpoints ---------------------------------------------------------------------

async def models(ctx: "ApiContext", request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [_model(m) for m in text_models(ctx.node)]})


async def model(ctx: "ApiContext", request: Request) -> JSONResponse:
    name = request.path_params["model"]
    for m in text_models(ctx.node):
        if m["domain"] == name:
            return JSONResponse(_model(m))
    raise AemError(errors.NOT_FOUND, f"no host in the mesh serves domain {name!r}")


def _model(m: dict) -> dict:
    return {"id": m["domain"], "object": "model", "created": m["created"], "owned_by": "aem-mesh",
            "aem": {"min_price": m["min_price"], "min_price_credits": fmt_credits(m["min_price"]),
                    "hosts": m["hosts"]}}


async def chat_completions(ctx: "ApiContext", request: Request):
    body = await read_json(request)
    args = common_args(ctx, body)
    args["messages"] = chat_messages(body)
    return await _run(ctx, body, args, chat=True)


async def completions(ctx: "ApiContext", request: Request):
    body = await read_json(request)
    args = common_args(ctx, body)
    args["prompt"] = completion_prompt(body)
    return await _run(ctx, body, args, chat=False)


async def _run(ctx: "ApiContext", body: dict, args: dict, *, chat: bool):
    if body.get("stream"):
        so = body.get("stream_options") or {}
        include_usage = isinstance(so, dict) and so.get("include_usage") is True
        return TaskStream(ctx, args, chat=chat, include_usage=include_usage)
    try:
        res = await ctx.svc.submit(args, _ignore)
    except AemError as exc:
        return await error_response(ctx, exc, args)
    text = output_text(res)
    fr = finish_reason(res, args["max_tokens"])
    created = int(time.time())
    if chat:
        out = {"id": f"chatcmpl-{res['task_id']}", "object": "chat.completion", "created": created,
               "model": args["domain"],
               "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                            "finish_reason": fr, "logprobs": None}]}
    else:
        out = {"id": f"cmpl-{res['task_id']}", "object": "text_completion", "created": created,
               "model": args["domain"],
               "choices": [{"index": 0, "text": text, "finish_reason": fr, "logprobs": None}]}
    out["usage"] = usage(res)
    out["aem"] = aem_fields(res)
    return JSONResponse(out)


async def _ignore(event: dict) -> None:
    return None


class TaskStream:
    """A streamed answer: an ASGI response that runs the task itself.

    The HTTP status is sent only once the task has a host to go to (the
    ``task`` event of ``submit``), so that errors before any work (no host,
    no funds, bad input) still come back as a plain error response with its
    status; later failures arrive as a final ``data: {"error": ...}`` event,
    which OpenAI's clients raise as an APIError. If the client goes away the
    task is cancelled. Output chunks are bytes; an incremental UTF-8
    decoder keeps a character split across chunks whole.

    When a host fails mid-stream and another one takes over, the new host's
    output starts from the beginning: the bytes the client already has are
    not sent again (a deterministic task repeats them exactly), and only what
    goes beyond them is streamed."""

    def __init__(self, ctx: "ApiContext", args: dict, *, chat: bool, include_usage: bool) -> None:
        self.ctx, self.args, self.chat, self.include_usage = ctx, args, chat, include_usage
        self.created = int(time.time())
        self.id = ""
        self.started = False
        self.sent = bytearray()         # output bytes streamed to the client
        self.attempt = bytearray()      # output bytes of the current host's attempt
        self.diverged = False
        self.decoder = codecs.getincrementaldecoder("utf-8")("ignore")
        self.text = ""                  # what the client has received, decoded

    def _chunk(self, delta: str | None, finish: str | None = None, role: bool = False) -> dict:
        if self.chat:
            d: dict[str, Any] = {}
            if role:
                d["role"] = "assistant"
            if delta is not None:
                d["content"] = delta
            choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.args["domain"],
                "choices": [choice]}

    async def __call__(self, scope, receive, send) -> None:
        async def event(obj: Any) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})

        async def start() -> None:
            if self.started:
                return
            self.started = True
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
            await event(self._chunk("" if self.chat else None, role=True))

        async def text(data: bytes, final: bool = False) -> None:
            s = self.decoder.decode(data, final=final)
            if s:
                self.text += s
                await event(self._chunk(s))

        async def emit(ev: dict) -> None:
            kind = ev.get("event")
            if log.isEnabledFor(logging.DEBUG) and (kind != "chunk" or not self.sent):
                log.debug("api stream: %s after %.1f ms", kind, (time.monotonic() - self.t0) * 1000)
            if kind == "task":
                self.id = ("chatcmpl-" if self.chat else "cmpl-") + str(ev.get("task_id", ""))
                await start()
            elif kind == "attempt":          # that host failed; the next one starts over
                self.attempt = bytearray()
            elif kind == "chunk":
                data = bytes(ev.get("data", b""))
                old = len(self.attempt)
                self.attempt += data
                if not self.diverged:
                    overlap = min(len(data), max(0, len(self.sent) - old))   # already streamed
                    if overlap and bytes(self.sent[old:old + overlap]) != data[:overlap]:
                        self.diverged = True
                    else:
                        data = data[overlap:]
                        self.sent += data
                if data:
                    await start()
                    await text(data)

        async def watch_disconnect(cancel: trio.CancelScope) -> None:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    cancel.cancel()
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_disconnect, nursery.cancel_scope)
            self.t0 = time.monotonic()
            try:
                res = await self.ctx.svc.submit(self.args, emit)
            except AemError as exc:
                if not self.started:
                    resp = await error_response(self.ctx, exc, self.args)
                    await resp(scope, receive, send)
                else:
                    _, body = api_errors.from_aem(exc)
                    await event(body)
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                nursery.cancel_scope.cancel()
                return
            if not self.id:
                self.id = ("chatcmpl-" if self.chat else "cmpl-") + res["task_id"]
            await start()
            await text(b"", final=True)
            full = output_text(res)
            if not self.diverged and full.startswith(self.text) and len(full) > len(self.text):
                await event(self._chunk(full[len(self.text):]))    # chunks lost to a slow reader
            last = self._chunk(None if self.chat else "", finish=finish_reason(res, self.args["max_tokens"]))
            last["aem"] = aem_fields(res)
            if self.diverged:
                last["aem"]["restarted"] = True
            await event(last)
            if self.include_usage:
                u = self._chunk(None)
                u["choices"] = []
                u["usage"] = usage(res)
                await event(u)
            await event("[DONE]")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            nursery.cancel_scope.cancel()
