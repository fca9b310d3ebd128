"""Structured answers: a JSON schema (or "any JSON object") as a GBNF grammar for llama.cpp's
grammar sampler.

The conversion is llama-cpp-python's own (``llama_cpp.llama_grammar``, a port of llama.cpp's
``json_schema_to_grammar``), so the grammar dialect always matches the sampler that parses it;
this module only adds the error messages. Its converter does not enforce numeric bounds
(``minimum``, ``maximum``, ...): a schema that has them is converted with a warning. Strings,
arrays and objects without bounds can grow until ``max_tokens``: a schema with ``enum``,
``maxLength`` or ``maxItems`` bounds the answer.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from mra.core.errors import MissingDependency, MraError

log = logging.getLogger("mra.runtime.grammar")

# Keywords llama-cpp-python's converter (0.3.x) ignores: the grammar does not enforce them.
UNENFORCED = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def _grammar_module():
    try:
        import llama_cpp.llama_grammar as g
    except ImportError as e:
        raise MissingDependency(f"grammar | cannot import llama_cpp.llama_grammar ({e}); install llama-cpp-python "
                       "(`pip install 'mra-edge[llm]'`)") from None
    return g


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
    return _grammar_module().JSON_GBNF  # its root rule is `object`


def schema_to_gbnf(schema: dict[str, Any] | str) -> str:
    """GBNF for a JSON schema (a dict, or its JSON text)."""
    if isinstance(schema, (dict, bool)):
        text = json.dumps(schema)
    elif isinstance(schema, str):
        text = schema
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise MraError(f"json_schema | not valid JSON ({e}); expected a JSON schema object") from None
    else:
        raise MraError(f"json_schema | got {type(schema).__name__}, expected a dict or JSON text")
    ignored = sorted(unenforced_keywords(json.loads(text)))
    if ignored:
        log.warning("json_schema | %s not enforced by llama.cpp's schema converter: check those values in the "
                    "answer", ", ".join(ignored))
    try:
        return _grammar_module().json_schema_to_gbnf(text)
    except MraError:
        raise
    except Exception as e:  # the converter raises plain exceptions for schemas it does not support
        raise MraError(f"json_schema | cannot be turned into a grammar: {type(e).__name__}: {e}; "
                       "simplify the schema (llama.cpp supports most of JSON schema draft 2020-12)") from None


def unenforced_keywords(schema: Any) -> set[str]:
    """The keywords of ``UNENFORCED`` used anywhere in ``schema``."""
    if isinstance(schema, dict):
        found = {k for k in schema if k in UNENFORCED}
        for k, v in schema.items():
            if k not in ("enum", "const"):  # values, not schemas
                found |= unenforced_keywords(v)
        return found
    if isinstance(schema, list):
        return set().union(*map(unenforced_keywords, schema)) if schema else set()
    return set()


def grammar_for(json_schema: dict[str, Any] | str | None = None, grammar: str | None = None) -> str | None:
    """The GBNF to sample with: ``grammar`` as given, or ``json_schema`` converted; never both."""
    if json_schema is not None and grammar is not None:
        raise MraError("structured output | got both json_schema and grammar; pass one")
    if grammar is not None:
        if not isinstance(grammar, str) or "root" not in grammar:
            raise MraError("grammar | expected GBNF text with a `root ::= ...` rule")
        return grammar
    return schema_to_gbnf(json_schema) if json_schema is not None else None
