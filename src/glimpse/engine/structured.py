"""Structured output: JSON schema, JSON object and regex constraints enforced while decoding.

Built on llguidance (a Rust grammar engine: an Earley parser over lazily built regex lexers). It
needs no precompiled per-vocabulary tables, so a schema compiles in about a millisecond even at a
131,072-token vocabulary, and bounded strings (`maxLength`) cost no more per token than free ones.

Three pieces:

- `StructuredOutputCompiler(tokenizer, vocab_size, eos_token_ids)`: one per engine. Turns a
  `SamplingParams` constraint into a `CompiledGrammar`, kept in a thread-safe LRU cache keyed by
  (kind, canonical spec), so the same schema sent by many requests compiles once. Request threads
  may compile (and so validate) while the engine thread makes matchers. Invalid schemas and regexes
  raise `InvalidRequestError` (HTTP 400).
- `GrammarMatcher`: the parse state of one sequence. `fill_bitmask` / `fill_mask` / `allowed_mask`
  give the tokens allowed next, `accept(token)` advances, `is_terminated()` says the grammar is
  complete and only EOS can follow. Owned by one thread (the engine's); not safe to share.
- `batch_allowed_mask(matchers, vocab_size, device)`: the `[B, V]` bool mask for a batch, the
  constrained rows computed in parallel (GIL released) and shipped to the device as bits.

Semantics:

- json_schema: a dict, a JSON string, or `True` (any JSON value). Output is compact JSON with
  json.dumps' default separators (`", "`, `": "`) and no other whitespace, unless the compiler was
  built with `whitespace_flexible=True` (free JSON whitespace, which random or weak models can fill
  forever). Properties come out in the order the schema lists them. A schema may carry llguidance's
  own options under `"x-guidance"`. Unsupported keywords (e.g. `uniqueItems`) are a 400, not ignored.
- json_object (OpenAI `response_format`): the schema `{"type": "object"}` (`JSON_OBJECT_SCHEMA`).
- regex: Rust `regex` crate syntax, matched against the WHOLE output (as if anchored); no
  look-around or back-references. `\\d` means [0-9], as constrained decoders usually read it
  (Unicode digits would let a model write digits that older Unicode tables, Python 3.11's among
  them, do not call digits); `\\w` and `\\s` are Unicode-aware, as in Python's `re` on str.
- Special tokens (images, `<think>`, ...) are never allowed inside the grammar; the EOS ids are
  allowed exactly when the text so far is a complete match (`is_accepting()`), and once nothing but
  EOS can follow (`is_terminated()`) the mask is exactly the EOS ids. Ids at or past the
  tokenizer's size (a padded logits width) are never allowed.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from glimpse.errors import InvalidRequestError
from glimpse.sampling_params import SamplingParams

JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}

# Bit k of an int32 word, as int32 (bit 31 is the sign bit: -2**31).
_BIT_VALUES = [(1 << k) if k < 31 else -(1 << 31) for k in range(32)]
_MAX_ERROR_CHARS = 600


def _llg():
    import llguidance

    return llguidance


def _words(width: int) -> int:
    return (width + 31) // 32


def _clean_error(message: str) -> str:
    """llguidance's message without the echo of its internal grammar (lines like `   1 | start: ...`)."""
    lines = []
    for line in message.strip().splitlines():
        head = line.strip().split("|", 1)[0].strip()
        if "|" in line and head.isdigit():
            break
        lines.append(line.rstrip())
    text = "\n".join(lines).strip() or message.strip()
    return text[:_MAX_ERROR_CHARS]


def unpack_bitmask(
    words: torch.Tensor, vocab_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """int32 bitmask `[..., W]` (token i at word i // 32, bit i % 32) -> bool `[..., vocab_size]`.

    On the CPU numpy's unpackbits does it (the words' little-endian bytes are exactly that order);
    elsewhere the words move to `device` first (4 bytes per 32 tokens) and expand there.
    """
    device = torch.device(device) if device is not None else words.device
    if device.type == "cpu":
        raw = words.detach().cpu().contiguous().view(torch.uint8).numpy()
        bits = np.unpackbits(raw, axis=-1, bitorder="little").view(np.bool_)
        return torch.from_numpy(bits)[..., :vocab_size]
    return _expand_bits(words.to(device, non_blocking=True), vocab_size)


def _expand_bits(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """unpack_bitmask with torch ops on the words' own device (one elementwise kernel on a GPU)."""
    values = torch.tensor(_BIT_VALUES, dtype=torch.int32, device=words.device)
    mask = (words.unsqueeze(-1) & values) != 0
    return mask.reshape(*words.shape[:-1], words.shape[-1] * 32)[..., :vocab_size]


class CompiledGrammar:
    """A validated grammar for one (kind, spec); immutable and shared by every matcher made from it."""

    __slots__ = ("kind", "spec", "vocab_size", "_template", "_lock", "_compiler")

    def __init__(self, kind: str, spec: str, template: Any, compiler: StructuredOutputCompiler) -> None:
        self.kind = kind  # "json_schema" or "regex"
        self.spec = spec  # the canonical spec (compact JSON text of the schema, or the regex)
        self.vocab_size = compiler.vocab_size
        self._template = template  # an llguidance LLMatcher in its initial state, never advanced
        self._lock = threading.Lock()
        self._compiler = compiler

    def new_state(self) -> Any:
        with self._lock:
            return self._template.deep_copy()

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self)

    def __repr__(self) -> str:
        spec = self.spec if len(self.spec) <= 60 else self.spec[:57] + "..."
        return f"CompiledGrammar({self.kind}, {spec!r})"


class StructuredOutputCompiler:
    """Compiles constraints for one tokenizer and logits width; thread-safe, with an LRU cache.

    tokenizer: a transformers fast tokenizer (anything with `backend_tokenizer`) or a
    `tokenizers.Tokenizer`. vocab_size: the model's logits width, possibly padded past the
    tokenizer's size. eos_token_ids: the ids that end a sequence (the tokenizer's EOS if empty).
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        *,
        cache_size: int = 256,
        whitespace_flexible: bool = False,
        json_separators: tuple[str, str] = (", ", ": "),
    ) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if not hasattr(backend, "to_str"):
            raise TypeError("structured output needs a fast (Rust `tokenizers`) tokenizer")
        self.tokenizer = tokenizer
        self._backend = backend
        self.tokenizer_size = int(backend.get_vocab_size(with_added_tokens=True))
        self.vocab_size = int(vocab_size)
        eos = [int(t) for t in eos_token_ids]
        if not eos and getattr(tokenizer, "eos_token_id", None) is not None:
            eos = [int(tokenizer.eos_token_id)]
        if not eos:
            raise ValueError("structured output needs at least one EOS token id")
        if any(not 0 <= t < min(self.vocab_size, self.tokenizer_size) for t in eos):
            raise ValueError(f"EOS ids {eos} outside the vocabulary")
        self.eos_token_ids = sorted(set(eos))
        # llguidance's own vocabulary width: covers both the logits and the tokenizer.
        self.width = max(self.vocab_size, self.tokenizer_size)
        self.num_words = _words(self.width)
        self.cache_size = max(1, int(cache_size))
        if whitespace_flexible:
            self._json_options: dict[str, Any] = {"whitespace_flexible": True}
        else:
            item_sep, key_sep = json_separators
            self._json_options = {
                "whitespace_flexible": False,
                "item_separator": item_sep,
                "key_separator": key_sep,
            }
        self._lock = threading.Lock()  # the cache and its counters
        self._tok_lock = threading.Lock()  # building llguidance's tokenizer (cache hits never wait on it)
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._ll_tokenizer: Any = None
        self._limits: Any = None
        self._valid_words: torch.Tensor | None = None
        self.hits = 0
        self.misses = 0

    # -- setup -----------------------------------------------------------------------------------------
    def warmup(self) -> None:
        """Build llguidance's view of the vocabulary now (about 2 s at 131,072 tokens) instead of at
        the first constrained request. Safe to run in a background thread."""
        self._tokenizer()

    def _tokenizer(self) -> Any:
        with self._tok_lock:
            if self._ll_tokenizer is None:
                llg = _llg()
                backend = self._backend
                if hasattr(backend, "no_padding"):  # serialise a copy without padding/truncation
                    import copy

                    backend = copy.copy(backend)
                    backend.no_padding()
                    backend.no_truncation()
                self._ll_tokenizer = llg.LLTokenizer(
                    backend.to_str(), n_vocab=self.width, eos_token=list(self.eos_token_ids)
                )
                self._limits = llg.LLParserLimits(verbose_errors=False)
            return self._ll_tokenizer

    def valid_words(self) -> torch.Tensor:
        """int32 [num_words]: the bits of ids that exist both in the tokenizer and in the logits."""
        if self._valid_words is None:
            mask = torch.zeros(self.num_words * 32, dtype=torch.int64)
            mask[: min(self.vocab_size, self.tokenizer_size)] = 1
            weights = torch.tensor(_BIT_VALUES, dtype=torch.int64)
            words = (mask.view(self.num_words, 32) * weights).sum(-1)
            self._valid_words = words.to(torch.int32)
        return self._valid_words

    # -- compiling -------------------------------------------------------------------------------------
    def compile(self, params: SamplingParams) -> CompiledGrammar | None:
        """The compiled constraint of `params` (None if it has none); raises InvalidRequestError."""
        if params.json_schema is not None:
            return self.compile_json_schema(params.json_schema)
        if params.regex is not None:
            return self.compile_regex(params.regex)
        return None

    def matcher(self, params: SamplingParams) -> GrammarMatcher | None:
        """A fresh matcher for one sequence of `params` (None when it has no constraint)."""
        compiled = self.compile(params)
        return None if compiled is None else GrammarMatcher(compiled)

    def compile_json_schema(self, schema: dict[str, Any] | str | bool) -> CompiledGrammar:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise InvalidRequestError(f"json_schema is not valid JSON: {e}", param="json_schema") from e
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise InvalidRequestError(
                f"json_schema must be a JSON object, got {type(schema).__name__}", param="json_schema"
            )
        try:
            # Key order is kept: it is the order in which properties are generated.
            spec = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(
                f"json_schema is not JSON-serialisable: {e}", param="json_schema"
            ) from e
        return self._cached("json_schema", spec)

    def compile_json_object(self) -> CompiledGrammar:
        return self.compile_json_schema(JSON_OBJECT_SCHEMA)

    def compile_regex(self, pattern: str) -> CompiledGrammar:
        if not isinstance(pattern, str):
            raise InvalidRequestError(f"regex must be a string, got {type(pattern).__name__}", param="regex")
        return self._cached("regex", pattern)

    def _cached(self, kind: str, spec: str) -> CompiledGrammar:
        key = (kind, spec)
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                owner = False
            else:
                fut = Future()
                self._cache[key] = fut
                self.misses += 1
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
                owner = True
        if owner:  # compile outside the lock; others asking for the same key wait on the future
            try:
                fut.set_result(self._build(kind, spec))
            except BaseException as e:  # noqa: BLE001 - delivered to every waiter, re-raised below
                if not isinstance(e, InvalidRequestError):  # keep only verdicts on the spec itself
                    with self._lock:
                        if self._cache.get(key) is fut:
                            del self._cache[key]
                fut.set_exception(e)
        return fut.result()

    def _build(self, kind: str, spec: str) -> CompiledGrammar:
        llg = _llg()
        tok = self._tokenizer()
        param = "json_schema" if kind == "json_schema" else "regex"
        try:
            if kind == "json_schema":
                grammar = llg.LLMatcher.grammar_from_json_schema(spec, defaults=self._json_options)
            else:  # `\\d` as [0-9] (see the module doc); regex_to_lark also escapes `/`
                grammar = llg.LLMatcher.grammar_from_lark(f"start: /{llg.regex_to_lark(spec, 'd')}/")
        except ValueError as e:
            raise InvalidRequestError(f"invalid {param}: {_clean_error(str(e))}", param=param) from e
        template = llg.LLMatcher(tok, grammar, log_level=0, limits=self._limits)
        if template.is_error():
            raise InvalidRequestError(f"invalid {param}: {_clean_error(template.get_error())}", param=param)
        return CompiledGrammar(kind, spec, template, self)

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "size": len(self._cache)}

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()


class GrammarMatcher:
    """The grammar state of one sequence. Use from one thread at a time (the engine's)."""

    def __init__(self, compiled: CompiledGrammar) -> None:
        self.compiled = compiled
        self._compiler = compiled._compiler
        self.vocab_size = compiled.vocab_size
        self._m = compiled.new_state()
        self.num_accepted = 0

    # -- masks -----------------------------------------------------------------------------------------
    def fill_bitmask(self, out: torch.Tensor) -> None:
        """Write the allowed-token bits into `out`, a contiguous CPU int32 tensor of `num_words`
        words (token i: word i // 32, bit i % 32). Padded and unknown ids are cleared."""
        c = self._compiler
        if out.dtype != torch.int32 or out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError("the bitmask must be a contiguous CPU int32 tensor")
        if out.numel() != c.num_words:
            raise ValueError(f"the bitmask needs {c.num_words} words, got {out.numel()}")
        self._m.unsafe_compute_mask_ptr(out.data_ptr(), c.num_words * 4)
        out.view(-1).bitwise_and_(c.valid_words())

    @property
    def num_words(self) -> int:
        return self._compiler.num_words

    def allowed_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """bool [vocab_size]: True where the token may come next."""
        words = torch.empty(self.num_words, dtype=torch.int32)
        self.fill_bitmask(words)
        return unpack_bitmask(words, self.vocab_size, device)

    def fill_mask(self, out_row: torch.Tensor) -> None:
        """Write the allowed mask into `out_row` (bool [vocab_size], any device), e.g. a row of [B, V]."""
        if out_row.shape != (self.vocab_size,):
            raise ValueError(f"expected a row of {self.vocab_size} entries, got {tuple(out_row.shape)}")
        out_row.copy_(self.allowed_mask(out_row.device))

    # -- state -----------------------------------------------------------------------------------------
    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token. False (and no change) if the grammar does not allow it."""
        token_id = int(token_id)
        if not 0 <= token_id < min(self.vocab_size, self._compiler.tokenizer_size):
            return False
        if self._m.try_consume_tokens([token_id]) != 1:
            # EOS once complete and stopped is fine (llguidance only takes it through consume_token).
            if not (token_id in self._compiler.eos_token_ids and self._m.is_stopped()):
                return False
            self._m.consume_token(token_id)
        self.num_accepted += 1
        return True

    def is_accepting(self) -> bool:
        """The text so far is a complete match: EOS is allowed now (other tokens may be too)."""
        return bool(self._m.is_accepting())

    def is_terminated(self) -> bool:
        """Complete, and nothing but EOS can follow (or EOS was accepted): stop the sequence."""
        return bool(self._m.is_stopped())

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (speculative decoding, preemption)."""
        if num_tokens <= 0:
            return
        if num_tokens > self.num_accepted or not self._m.rollback(num_tokens):
            raise ValueError(f"cannot roll back {num_tokens} of {self.num_accepted} tokens")
        self.num_accepted -= num_tokens

    def reset(self) -> None:
        """Back to the initial state (as if freshly made)."""
        self._m = self.compiled.new_state()
        self.num_accepted = 0

    def __repr__(self) -> str:
        return f"GrammarMatcher({self.compiled!r}, accepted={self.num_accepted})"


# -- batches -------------------------------------------------------------------------------------------------
_executor_lock = threading.Lock()
_executor: Any = None


def _get_executor() -> Any:
    global _executor
    with _executor_lock:
        if _executor is None:
            threads = max(1, min(16, (os.cpu_count() or 2) - 1))
            _executor = _llg().LLExecutor(num_threads=threads)
        return _executor


def batch_allowed_mask(
    matchers: Sequence[GrammarMatcher | None], vocab_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """bool [B, vocab_size] for a batch: each constrained row its grammar's mask, others all True.

    None when no row is constrained (the sampler then skips the mask). The constrained rows are
    computed in parallel on the CPU (llguidance's executor, GIL released), shipped as int32 bits
    and expanded on `device`.
    """
    rows = [(i, m) for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    compiler = rows[0][1]._compiler
    if any(m.vocab_size != vocab_size or m._compiler.num_words != compiler.num_words for _, m in rows):
        raise ValueError("every matcher of a batch must be made for the same vocab_size")
    device = torch.device(device)
    pin = device.type == "cuda"
    words = torch.full((len(matchers), compiler.num_words), -1, dtype=torch.int32, pin_memory=pin)
    if len(rows) == 1:
        i, m = rows[0]
        m.fill_bitmask(words[i])
    else:
        executor = _get_executor()
        executor.unsafe_compute_mask_ptr(
            [(m._m, i) for i, m in rows], words.data_ptr(), compiler.num_words * 4, len(matchers)
        )
        idx = torch.tensor([i for i, _ in rows])
        words[idx] = words[idx] & compiler.valid_words()
    return unpack_bitmask(words, vocab_size, device)
