"""Structured answers: a JSON schema, "any JSON object" or a GBNF grammar as a token constraint,
enforced by llguidance (the constrained-decoding library llama.cpp itself uses for schemas).

    g = json_schema_grammar({"type": "object", ...})      # checked, bounded; no vocabulary needed
    c = ConstraintCompiler(llm.vocab).compile(g)          # once per grammar and vocabulary (cached)
    state = c.start()                                     # one per sequence
    state.mask(logits)                                    # in place: disallowed tokens -> -inf
    state.accept(token)

Why llguidance and not llama.cpp's GBNF sampler: the JSON-schema-to-GBNF converter writes one
rule element per bounded repetition (``minLength: 1e9`` took 22 GB before the sampler existed;
``maxLength: 20000`` nests 20,000 deep and crashes ``llama_sampler_init_grammar``), it ignores
``minimum``/``maximum``, and a hand-written GBNF grammar can crash the same parser. llguidance
compiles repetitions lazily, enforces numeric bounds and stops at stated limits
(:class:`ConstraintLimits`), so the explicit GBNF ``grammar=`` goes through it too: one engine,
one set of bounds, no grammar text ever reaches llama.cpp's recursive parser.
"""

from __future__ import annotations

import collections
import json
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from mra.core.errors import LimitExceeded, MissingDependency, MraError


@dataclass(frozen=True)
class ConstraintLimits:
    """What one grammar may cost. The llguidance limits bound compile time (lexer fuel: ~50k per
    ms), per-token time (step fuel and items) and memory (lexer states: ~1-2 kB each)."""
    max_source_bytes: int = 64 << 10  # the schema's JSON text, or the GBNF text
    max_depth: int = 64  # nesting of the schema's objects and lists
    max_grammar_size: int = 200_000  # grammar symbols after compilation
    max_lexer_states: int = 20_000  # about 40 MB at most
    initial_lexer_fuel: int = 1_000_000  # about 20 ms
    step_lexer_fuel: int = 200_000  # per token, about 15 ms
    step_max_items: int = 50_000  # Earley items per token

    def llguidance(self):
        return _llg().LLParserLimits(max_grammar_size=self.max_grammar_size, max_lexer_states=self.max_lexer_states,
                                     initial_lexer_fuel=self.initial_lexer_fuel, step_lexer_fuel=self.step_lexer_fuel,
                                     step_max_items=self.step_max_items, verbose_errors=False)


DEFAULT_LIMITS = ConstraintLimits()


@dataclass(frozen=True)
class Grammar:
    """A checked grammar, independent of any vocabulary (plain data: it travels to a Ray replica).
    ``spec`` is llguidance's grammar definition; ``source`` says where it came from, for messages."""
    spec: str
    source: str  # "json_schema" | "json_object" | "gbnf"


def _llg():
    try:
        import llguidance
    except ImportError as e:
        raise MissingDependency(f"structured answers | cannot import llguidance ({e}); install it with "
                                "`pip install 'mra-edge[llm]'`") from None
    return llguidance


def json_depth(value: Any) -> int:
    """Nesting depth of dicts and lists (iterative: a deep value cannot exhaust the stack)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, d)
            todo.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))
    return deepest


def _check(grammar: Grammar, limits: ConstraintLimits) -> Grammar:
    """Compile without a vocabulary, under ``limits``: a grammar past a limit is refused here."""
    llg = _llg()
    error = llg.LLMatcher.validate_grammar(grammar.spec, None, limits=limits.llguidance())
    if error:
        raise MraError(f"{grammar.source} | refused by the grammar compiler: {error}; simplify it (bounds: "
                       f"{limits.max_grammar_size} grammar symbols, {limits.max_lexer_states} lexer states)")
    return grammar


def _check_size(what: str, n: int, limits: ConstraintLimits) -> None:
    if n > limits.max_source_bytes:
        raise LimitExceeded(f"{what} | {n} bytes, the bound is {limits.max_source_bytes}; send a smaller one")


def json_schema_grammar(schema: dict | bool | str, limits: ConstraintLimits = DEFAULT_LIMITS) -> Grammar:
    """The grammar of answers that follow ``schema`` (a dict, or its JSON text)."""
    if isinstance(schema, str):
        _check_size("json_schema", len(schema.encode("utf-8", "surrogatepass")), limits)
        try:
            schema = json.loads(schema)
        except (json.JSONDecodeError, RecursionError) as e:
            raise MraError(f"json_schema | not valid JSON ({e}); expected a JSON schema object") from None
    if not isinstance(schema, (dict, bool)):
        raise MraError(f"json_schema | got {type(schema).__name__}, expected a schema object (a dict or JSON text)")
    depth = json_depth(schema)
    if depth > limits.max_depth:
        raise LimitExceeded(f"json_schema | nested {depth} deep, the bound is {limits.max_depth}; flatten it")
    try:
        text = json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise MraError(f"json_schema | not a JSON value ({e})") from None
    _check_size("json_schema", len(text.encode("utf-8", "surrogatepass")), limits)
    try:
        # No free whitespace: a model may otherwise fill max_tokens with it between two tokens of JSON.
        spec = _llg().LLMatcher.grammar_from_json_schema(text, overrides={"whitespace_flexible": False})
    except ValueError as e:
        raise MraError(f"json_schema | {e}; expected a JSON schema object") from None
    return _check(Grammar(spec, "json_schema"), limits)


def json_object_grammar(limits: ConstraintLimits = DEFAULT_LIMITS) -> Grammar:
    """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
    return json_schema_grammar({"type": "object"}, limits)


def gbnf_grammar(text: str, limits: ConstraintLimits = DEFAULT_LIMITS) -> Grammar:
    """A GBNF grammar (llama.cpp's dialect, ``root ::= ...``), translated to llguidance's Lark."""
    if not isinstance(text, str):
        raise MraError(f"grammar | got {type(text).__name__}, expected GBNF text with a `root ::= ...` rule")
    _check_size("grammar", len(text.encode("utf-8", "surrogatepass")), limits)
    try:
        spec = _llg().grammar_from("gbnf", text)
    except (ValueError, RecursionError) as e:  # the translator's syntax errors, and nesting past its stack
        raise MraError(f"grammar | not a GBNF grammar it can read: {str(e)[:300]}; check the GBNF (a "
                       "`root ::= ...` rule)") from None
    return _check(Grammar(spec, "gbnf"), limits)


def grammar_for(json_schema: dict | str | None = None, grammar: str | Grammar | None = None,
                limits: ConstraintLimits = DEFAULT_LIMITS) -> Grammar | None:
    """The constraint of a call: ``grammar`` (GBNF text, or a :class:`Grammar` already checked)
    or ``json_schema``; never both."""
    if json_schema is not None and grammar is not None:
        raise MraError("structured output | got both json_schema and grammar; pass one")
    if isinstance(grammar, Grammar):
        return grammar
    if grammar is not None:
        return gbnf_grammar(grammar, limits)
    return json_schema_grammar(json_schema, limits) if json_schema is not None else None


class Constraint:
    """A grammar compiled for one vocabulary: a matcher in its start state, copied per sequence."""

    def __init__(self, matcher, n_vocab: int, source: str):
        self._matcher, self.n_vocab, self.source = matcher, n_vocab, source

    def start(self) -> "ConstraintState":
        return ConstraintState(self._matcher.deep_copy(), self.n_vocab, self.source)


class ConstraintState:
    """One sequence's place in its grammar."""

    def __init__(self, matcher, n_vocab: int, source: str):
        self.matcher, self.n_vocab, self.source = matcher, n_vocab, source
        self._bits = np.full((1, (n_vocab + 31) // 32), -1, dtype=np.int32)

    def mask(self, logits: np.ndarray) -> None:
        """Set the logits of tokens the grammar does not allow next to -inf, in place."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self.matcher.is_error():  # the per-token work bounds (lexer fuel, Earley items) were met
            raise LimitExceeded(f"{self.source} | the constraint stopped: {self.matcher.get_error()}; simplify "
                                "the schema or grammar")
        allowed = np.unpackbits(self._bits.view(np.uint8), count=self.n_vocab, bitorder="little")
        logits[:self.n_vocab][allowed == 0] = -np.inf

    def accept(self, token: int) -> None:
        """Advance past ``token``; one the mask did not allow is an error."""
        if not self.matcher.consume_token(int(token)):
            raise MraError(f"{self.source} | token {token} refused: {self.matcher.get_error()}")


class ConstraintCompiler:
    """Compiles grammars for one llama.cpp vocabulary; the last ``cache`` grammars are kept, so a
    schema sent with every request is compiled once (each kept one holds at most its lexer-state
    bound: 8 x ~40 MB at worst). The vocabulary must outlive it."""

    def __init__(self, vocab, limits: ConstraintLimits = DEFAULT_LIMITS, cache: int = 8):
        from llguidance.llamacpp import lltokenizer_from_vocab

        _llg()
        self.tokenizer = lltokenizer_from_vocab(vocab)  # ~1 s for a 32k vocabulary: once per model
        self.limits, self.size = limits, cache
        self._cache: collections.OrderedDict[str, Constraint] = collections.OrderedDict()
        self._lock = threading.Lock()

    def compile(self, grammar: Grammar) -> Constraint:
        with self._lock:
            hit = self._cache.get(grammar.spec)
            if hit is not None:
                self._cache.move_to_end(grammar.spec)
                return hit
        matcher = _llg().LLMatcher(self.tokenizer, grammar.spec, limits=self.limits.llguidance(), log_level=0)
        if matcher.is_error():
            raise MraError(f"{grammar.source} | refused by the grammar compiler: {matcher.get_error()}; simplify it")
        c = Constraint(matcher, int(self.tokenizer.vocab_size), grammar.source)
        with self._lock:
            self._cache[grammar.spec] = c
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return c
