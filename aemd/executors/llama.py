"""Run GGUF capsules with llama.cpp (``llama-cpp-python``).

:class:`LlamaExecutor` loads a model once and serves many generations from it, one
at a time (a lock serialises them: a llama.cpp context is not thread-safe).

What a generation returns is defined by the direct call
``Llama(path, ...).create_completion(prompt, max_tokens=N, temperature=T, seed=S)``:
for the same file, arguments and prompt, :meth:`LlamaExecutor.generate` gives the
same text, the same number of completion tokens and the same finish reason. It does
not call ``create_completion`` itself, because that hides the token ids, cannot be
interrupted between tokens and gives no per-token times; instead it runs the same
steps on ``Llama.generate`` (the token loop ``create_completion`` is built on):

- prompt tokens: BOS (when the model asks for it) + the prompt tokenised with
  special tokens parsed, + EOS/SEP when the model asks for it;
- the same sampler chain and defaults (temperature 0 is greedy; otherwise top-k 40,
  typical 1.0, top-p 0.95, min-p 0.05, temperature, seeded distribution);
- the KV cache is reset before each generation, so the prompt is evaluated in full
  as on a freshly loaded model (a reused prefix can change logits in the last bits);
- an end-of-generation token stops with ``finish_reason == "stop"``; ``max_tokens``
  is capped to the context, and, as in ``create_completion``, a completion that ends
  inside what looks like a multi-byte UTF-8 sequence runs past ``max_tokens`` until
  that sequence could be complete;
- the text is the detokenised bytes decoded with ``errors="ignore"``. Random or bad
  weights emit invalid UTF-8; dropping invalid bytes is deterministic, and the
  pieces passed to ``on_token`` are decoded by an incremental decoder with the same
  rule, so ``"".join(pieces) == result.text`` always. The exact bytes are in
  ``result.output_bytes``.

Quantised models crash llama.cpp on CPUs with AMX (``ggml_backend_amx_mul_mat``)
unless the model's *extra buffer types* (weight repacking, AMX) are turned off.
``Llama()`` does not expose ``use_extra_bufts``; :func:`no_extra_bufts` makes the
model-parameter defaults that ``Llama.__init__`` starts from have it off while one
model loads (under a lock, restored afterwards), and the executor checks that the
loaded model's parameters really have it off.

Chat: :meth:`LlamaExecutor.chat` is, in the same way, the direct call
``create_chat_completion(messages, max_tokens=N, temperature=T, seed=S)`` on a
model whose GGUF metadata holds ``tokenizer.chat_template``: the template is
rendered with llama-cpp-python's own ``Jinja2ChatFormatter`` (a sandboxed Jinja2
environment, ``add_generation_prompt`` true, ``bos_token``/``eos_token`` the
model's token texts), the rendered text is tokenised with special tokens parsed and
no BOS added (the template writes its own), and the token loop above runs on it with
two more stops, as ``create_chat_completion`` does: the end-of-turn token (EOS; it
is an end-of-generation token, so the loop's own rule covers it) and the EOS text
as a stop string (the text is cut before it and no piece of it reaches
``on_token``). A model without a template refuses chat (``REFUSED``): guessing a
format would make the answer depend on a guess. llama-cpp-python swaps in a
built-in formatter for three exact template strings (ChatML, Mistral, Llama 3) and
falls back to Llama 2's format without a template; this executor always renders
the file's own template, which is what another implementation can reproduce.

Timeouts: a thread cannot be killed, so the token loop checks a cancel flag before
every decode step. :meth:`LlamaExecutor.agenerate` runs :meth:`generate` in a worker
thread under the caller's ``trio.CapacityLimiter`` and sets the flag when its
``trio.fail_after`` deadline passes or the caller is cancelled; the work stops at
the next token (a long prompt's evaluation is one step and is not interrupted).
"""

from __future__ import annotations

import codecs
import contextlib
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import trio

from protocol.errors import (BAD_TYPE, BAD_VALUE, NOT_FOUND, REFUSED, TIMEOUT, TOO_LARGE,
                             UNAVAILABLE, AemError)
from protocol.task import UTF8_TAIL_TOKENS

from .ggufmeta import check_gguf

__all__ = [
    "GenerationResult",
    "LlamaExecutor",
    "concurrency_from_memory",
    "no_extra_bufts",
    "MAX_PROMPT_BYTES",
    "MAX_NEW_TOKENS",
]

MAX_PROMPT_BYTES = 1 << 20          # prompt size limit, checked before tokenising
MAX_NEW_TOKENS = 1 << 16
MAX_SEED = 0xFFFFFFFF
MAX_TEMPERATURE_MILLI = 10_000
MAX_MESSAGES = 256
CHAT_ROLES = ("system", "user", "assistant")

# create_completion's sampling defaults (llama-cpp-python 0.3.36)
_SAMPLING = dict(top_k=40, top_p=0.95, min_p=0.05, typical_p=1.0, repeat_penalty=1.0,
                 frequency_penalty=0.0, presence_penalty=0.0, tfs_z=1.0,
                 mirostat_mode=0, mirostat_tau=5.0, mirostat_eta=0.1)

_params_lock = threading.Lock()


@contextlib.contextmanager
def no_extra_bufts() -> Iterator[None]:
    """While active, models loaded by ``llama_cpp.Llama`` have ``use_extra_bufts``
    off. ``Llama.__init__`` starts from ``llama_cpp.llama_model_default_params()``
    (looked up on the module at call time); this swaps that function for one that
    returns the same defaults with the flag cleared. A module lock serialises loads
    made through it, and the original is put back on exit. A load by other code in
    the meantime would also get the flag off, which is only ever the safe choice."""
    import llama_cpp.llama_cpp as lc

    with _params_lock:
        original = lc.llama_model_default_params

        def defaults_without_extra_bufts():
            params = original()
            params.use_extra_bufts = False
            return params

        lc.llama_model_default_params = defaults_without_extra_bufts
        try:
            yield
        finally:
            lc.llama_model_default_params = original


@dataclass(frozen=True)
class GenerationResult:
    text: str                    # == create_completion(...)["choices"][0]["text"]
    output_bytes: bytes          # the exact detokenised bytes of the completion
    tokens_out: int              # completion tokens (== usage.completion_tokens)
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str           # "stop" (end-of-generation token), "length", "cancelled"
    first_token_ns: int | None   # from the call's start to the first token (perf_counter_ns)
    last_token_ns: int | None    # from the call's start to the last token
    total_ns: int


def concurrency_from_memory(free_mb: int, per_task_mb: int) -> int:
    """How many generations fit side by side in ``free_mb``: at least 1."""
    for name, v in (("free_mb", free_mb), ("per_task_mb", per_task_mb)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise AemError(BAD_VALUE, f"{name} must be a non-negative integer")
    if per_task_mb == 0:
        raise AemError(BAD_VALUE, "per_task_mb must be positive")
    return max(1, free_mb // per_task_mb)


def _check_int(name: str, v: object, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise AemError(BAD_VALUE, f"{name} must be an integer in {lo}..{hi}, not {v!r}")
    return v


def _check_messages(messages: object) -> list[dict]:
    """A plain copy of a chat's messages, each ``{"role", "content"}`` and nothing else."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise AemError(BAD_VALUE, "messages must be a non-empty list")
    if len(messages) > MAX_MESSAGES:
        raise AemError(TOO_LARGE, f"more than {MAX_MESSAGES} messages")
    out, size = [], 0
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else \
            (getattr(m, "role", None), getattr(m, "content", None))
        if isinstance(m, dict) and set(m) != {"role", "content"}:
            raise AemError(BAD_VALUE, f"message {i} must have exactly role and content")
        if role not in CHAT_ROLES:
            raise AemError(BAD_VALUE, f"message {i}: role must be one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise AemError(BAD_TYPE, f"message {i}: content must be a string")
        try:
            size += len(content.encode("utf-8"))
        except UnicodeEncodeError:
            raise AemError(BAD_VALUE, f"message {i} is not encodable as UTF-8") from None
        out.append({"role": role, "content": content})
    if size > MAX_PROMPT_BYTES:
        raise AemError(TOO_LARGE, f"messages longer than {MAX_PROMPT_BYTES} bytes")
    return out


class LlamaExecutor:
    """One loaded GGUF model. Construct it in a worker thread: loading takes time."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        n_ctx: int = 512,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        seed: int = 0,
    ) -> None:
        import llama_cpp

        self.path = os.fspath(path)
        _check_int("n_ctx", n_ctx, 16, 1 << 20)
        if n_threads is not None:
            _check_int("n_threads", n_threads, 1, 1024)
        _check_int("n_gpu_layers", n_gpu_layers, -1, 1 << 16)
        _check_int("seed", seed, 0, MAX_SEED)
        if not os.path.isfile(self.path):
            raise AemError(NOT_FOUND, f"no model file at {self.path}")
        check_gguf(self.path)            # a malformed file never reaches llama.cpp
        self.n_ctx = n_ctx
        self.n_threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
        self._lock = threading.Lock()
        try:
            with no_extra_bufts():
                self._llm = llama_cpp.Llama(
                    model_path=self.path, n_ctx=n_ctx, n_threads=self.n_threads,
                    n_threads_batch=self.n_threads, n_gpu_layers=n_gpu_layers,
                    seed=seed, verbose=False)
        except (ValueError, RuntimeError, OSError) as e:
            raise AemError(UNAVAILABLE, f"llama.cpp cannot load {self.path}: {e}") from None
        if self._llm.model_params.use_extra_bufts:
            self._llm.close()
            raise AemError(UNAVAILABLE, "could not turn off llama.cpp extra buffer types")
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._vocab = self._llm._model.vocab

    def close(self) -> None:
        with self._lock:
            self._llm.close()

    def __enter__(self) -> "LlamaExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the prompt, exactly as create_completion builds it -------------------------

    def _prompt_tokens(self, prompt: str) -> list[int]:
        llm = self._llm
        model = llm._model
        bos = llm.token_bos()
        cls_id, sep_id = model.token_cls(), model.token_sep()
        bos_tokens = [cls_id if cls_id != -1 else bos]
        eos_tokens = [sep_id if sep_id != -1 else llm.token_eos()]
        if not model.add_bos_token() or bos_tokens[:1] == [-1]:
            bos_tokens = []
        if not model.add_eos_token() and sep_id == -1:
            eos_tokens = []
        body = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        return bos_tokens + body + eos_tokens

    def tokenize(self, prompt: str) -> list[int]:
        """The prompt tokens a generation would evaluate."""
        with self._lock:
            return self._prompt_tokens(prompt)

    # -- generation ----------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        max_tokens: int,
        seed: int,
        temperature_milli: int = 0,
        on_token: Callable[[str], None] | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """Generate up to ``max_tokens`` tokens after ``prompt``.

        ``temperature_milli`` is the temperature in thousandths (0: greedy, fully
        deterministic). ``on_token`` receives text pieces as they are decoded (from
        this thread). When ``cancel`` is set, the loop stops before the next decode
        step and the result has ``finish_reason == "cancelled"``."""
        if not isinstance(prompt, str):
            raise AemError(BAD_VALUE, "prompt must be a string")
        if not prompt:
            raise AemError(BAD_VALUE, "prompt is empty")
        if len(prompt) > MAX_PROMPT_BYTES:
            raise AemError(TOO_LARGE, f"prompt longer than {MAX_PROMPT_BYTES} bytes")
        try:
            if len(prompt.encode("utf-8")) > MAX_PROMPT_BYTES:
                raise AemError(TOO_LARGE, f"prompt longer than {MAX_PROMPT_BYTES} bytes")
        except UnicodeEncodeError:
            raise AemError(BAD_VALUE, "prompt is not encodable as UTF-8") from None
        _check_int("max_tokens", max_tokens, 1, MAX_NEW_TOKENS)
        _check_int("seed", seed, 0, MAX_SEED)
        _check_int("temperature_milli", temperature_milli, 0, MAX_TEMPERATURE_MILLI)
        with self._lock:
            t0 = time.perf_counter_ns()
            return self._generate(t0, self._prompt_tokens(prompt), max_tokens, seed,
                                  temperature_milli, on_token, cancel)

    # -- chat ------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The model's own chat template (GGUF ``tokenizer.chat_template``), if any."""
        t = self._llm.metadata.get("tokenizer.chat_template")
        return t if isinstance(t, str) and t else None

    def _token_text(self, token: int) -> str:
        return self._llm._model.token_get_text(token) if token != -1 else ""

    def _chat_prompt(self, messages: list[dict]) -> tuple[list[int], list[bytes]]:
        """The prompt tokens and stop strings of a chat, as create_chat_completion
        builds them from the model's template."""
        from jinja2.exceptions import TemplateError
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        template = self.chat_template
        if template is None:
            raise AemError(REFUSED, "this model has no chat template (tokenizer.chat_template); "
                                    "send a raw prompt instead")
        llm = self._llm
        eos = llm.token_eos()
        try:
            formatter = Jinja2ChatFormatter(template=template, eos_token=self._token_text(eos),
                                            bos_token=self._token_text(llm.token_bos()),
                                            stop_token_ids=[eos])
            rendered = formatter(messages=messages)
        except (TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            # A template may refuse a conversation (raise_exception), or be broken.
            raise AemError(BAD_VALUE, f"the model's chat template refused the messages: {e}"[:240]) from None
        if len(rendered.prompt.encode("utf-8", "replace")) > MAX_PROMPT_BYTES:
            raise AemError(TOO_LARGE, f"the rendered chat is longer than {MAX_PROMPT_BYTES} bytes")
        tokens = llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special,
                              special=True)
        stops = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop]
        # An empty stop string would match at once; llama-cpp-python does that for a
        # model without EOS text, which is never what anyone wants.
        return tokens, [x.encode("utf-8") for x in stops if x]

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """The prompt tokens a chat would evaluate."""
        with self._lock:
            return self._chat_prompt(_check_messages(messages))[0]

    def chat(
        self,
        messages: list[dict],
        max_tokens: int,
        seed: int,
        temperature_milli: int = 0,
        on_token: Callable[[str], None] | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """The assistant's answer to ``messages`` (a list of ``{"role", "content"}``),
        up to ``max_tokens`` tokens; otherwise as :meth:`generate`."""
        messages = _check_messages(messages)
        _check_int("max_tokens", max_tokens, 1, MAX_NEW_TOKENS)
        _check_int("seed", seed, 0, MAX_SEED)
        _check_int("temperature_milli", temperature_milli, 0, MAX_TEMPERATURE_MILLI)
        with self._lock:
            t0 = time.perf_counter_ns()
            tokens, stops = self._chat_prompt(messages)
            if tokens and tokens[-1] == self._llm.token_eos():
                # create_chat_completion's stopping criterion sees the end-of-turn
                # token as the last evaluated one and stops before sampling anything.
                return GenerationResult(text="", output_bytes=b"", tokens_out=0, token_ids=(),
                                        prompt_tokens=len(tokens), finish_reason="stop",
                                        first_token_ns=None, last_token_ns=None,
                                        total_ns=time.perf_counter_ns() - t0)
            return self._generate(t0, tokens, max_tokens, seed, temperature_milli, on_token,
                                  cancel, stops)

    def _generate(self, t0, prompt_tokens, max_tokens, seed, temperature_milli, on_token, cancel,
                  stops: list[bytes] = ()):
        llm = self._llm
        n_ctx = llm.n_ctx()
        if len(prompt_tokens) >= n_ctx:
            raise AemError(TOO_LARGE, f"prompt is {len(prompt_tokens)} tokens, "
                                      f"the context holds {n_ctx}")
        if max_tokens + len(prompt_tokens) >= n_ctx:
            max_tokens = n_ctx - len(prompt_tokens)
        # Token k is evaluated only when token k+1 is sampled, so n_ctx - prompt + 1
        # tokens can be sampled; one more would make llama_decode fail.
        room = n_ctx - len(prompt_tokens) + 1
        bos = llm.token_bos()

        llm.reset()                          # evaluate the prompt in full, every time
        llm.set_seed(seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        completion: list[int] = []
        out = bytearray()
        sent = 0                             # bytes of ``out`` passed to on_token
        first_ns = last_ns = None
        finish = "length"
        multibyte_fix = 0
        gen = llm.generate(prompt_tokens, temp=temperature_milli / 1000, **_SAMPLING)
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                token = next(gen)
                last_ns = time.perf_counter_ns() - t0
                if first_ns is None:
                    first_ns = last_ns
                if self._is_eog(self._vocab, token):
                    finish = "stop"
                    break
                completion.append(token)
                piece = llm.detokenize([token])
                if not out and completion[0] == bos and piece[:1] == b" ":
                    piece = piece[1:]        # detokenize() drops a space after a leading BOS
                out += piece
                if on_token is not None and not stops:
                    text_piece = decoder.decode(piece)
                    if text_piece:
                        on_token(text_piece)
                    sent = len(out)
                # create_completion holds back a completion whose last bytes look like
                # the start of a multi-byte sequence, even past max_tokens
                tail = out[-3:]
                for k, char in enumerate(tail):
                    k = 3 - k
                    for num, pattern in ((2, 192), (3, 224), (4, 240)):
                        if num > k and pattern & char == pattern:
                            multibyte_fix = num - k
                if len(completion) >= room:
                    break                    # the context is full
                if multibyte_fix > 0 and len(completion) < max_tokens + UTF8_TAIL_TOKENS:
                    # Past that, a run of lead bytes (random weights emit them)
                    # would go on without end; the protocol bounds the tail.
                    multibyte_fix -= 1
                    continue
                if stops:
                    # as create_completion: the text ends before the first stop string
                    # found; a tail that may begin one is held back from on_token.
                    hit = [x for x in stops if x in out]
                    if hit:
                        del out[out.index(hit[0]):]
                        finish = "stop"
                        break
                    hold = max((i for x in stops for i in range(min(len(x), len(out)), 0, -1)
                                if out.endswith(x[:i])), default=0)
                    if on_token is not None and len(out) - hold > sent:
                        text_piece = decoder.decode(bytes(out[sent:len(out) - hold]))
                        sent = len(out) - hold
                        if text_piece:
                            on_token(text_piece)
                if len(completion) >= max_tokens:
                    break
        finally:
            gen.close()
        if on_token is not None:
            rest = decoder.decode(bytes(out[sent:]), final=True)
            if rest:
                on_token(rest)
        output = bytes(out)
        if not stops and output != llm.detokenize(completion, prev_tokens=prompt_tokens):
            raise AemError(UNAVAILABLE, "llama.cpp detokenised the completion differently")
        return GenerationResult(
            text=output.decode("utf-8", errors="ignore"),
            output_bytes=output,
            tokens_out=len(completion),
            token_ids=tuple(int(t) for t in completion),
            prompt_tokens=len(prompt_tokens),
            finish_reason=finish,
            first_token_ns=first_ns,
            last_token_ns=last_ns,
            total_ns=time.perf_counter_ns() - t0,
        )

    async def achat(
        self,
        messages: list[dict],
        max_tokens: int,
        seed: int,
        temperature_milli: int = 0,
        on_token: Callable[[str], None] | None = None,
        *,
        limiter: trio.CapacityLimiter,
        timeout_s: float,
    ) -> GenerationResult:
        """:meth:`chat` in a worker thread, with :meth:`agenerate`'s rules."""
        return await self._in_thread(
            lambda cancel: self.chat(messages, max_tokens, seed, temperature_milli, on_token,
                                     cancel=cancel), limiter, timeout_s)

    async def agenerate(
        self,
        prompt: str,
        max_tokens: int,
        seed: int,
        temperature_milli: int = 0,
        on_token: Callable[[str], None] | None = None,
        *,
        limiter: trio.CapacityLimiter,
        timeout_s: float,
    ) -> GenerationResult:
        """:meth:`generate` in a worker thread under ``limiter``; ``AemError(TIMEOUT)``
        when it takes longer than ``timeout_s`` (time waiting for the limiter counts).

        ``on_token`` is called from the worker thread; use ``trio.from_thread`` or a
        thread-safe queue in it to reach the event loop. On timeout or cancellation
        the worker is told to stop at its next token; this returns (or raises) at
        once, and the next generation on this executor waits for the old one to
        finish its current token (the executor's lock)."""
        return await self._in_thread(
            lambda cancel: self.generate(prompt, max_tokens, seed, temperature_milli, on_token,
                                         cancel=cancel), limiter, timeout_s)

    async def _in_thread(self, fn: Callable[[threading.Event], GenerationResult],
                         limiter: trio.CapacityLimiter, timeout_s: float) -> GenerationResult:
        if not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
            raise AemError(BAD_VALUE, "timeout_s must be a positive number")
        cancel = threading.Event()
        try:
            with trio.fail_after(timeout_s):
                result = await trio.to_thread.run_sync(
                    lambda: fn(cancel), limiter=limiter, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise AemError(TIMEOUT, f"generation took longer than {timeout_s} s") from None
        finally:
            cancel.set()
        return result
