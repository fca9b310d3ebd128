"""Structured answers through llguidance's token masks: JSON-schema answers of the tiny
random model parse and validate (jsonschema, an independent validator) on real photos, greedy
and sampled, streamed or not; GBNF grammars; mra-run --json-schema; clear errors."""

from __future__ import annotations

import json

import jsonschema
import pytest

from mra.runtime import MraError
from mra.runtime.cli import run_main

SCHEMA = {"type": "object",
          "properties": {"objects": {"type": "array", "items": {"enum": ["cat", "cup", "person", "rocket"]},
                                     "maxItems": 3},
                         "count": {"type": "integer", "minimum": 0, "maximum": 99},
                         "outdoor": {"type": "boolean"},
                         "caption": {"type": "string", "maxLength": 16}},
          "required": ["objects", "count", "outdoor", "caption"], "additionalProperties": False}


@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (0.8, 1), (1.5, 2)])
def test_json_schema_answers_validate(pipe, photo_paths, temperature, seed):
    for photo in photo_paths[:4]:
        text = pipe.ask(photo, "Describe the picture.", max_tokens=256, temperature=temperature, seed=seed,
                        json_schema=SCHEMA)
        assert pipe.llm.is_eog(pipe.last_tokens[-1]), text  # the grammar finished, then EOS
        jsonschema.validate(json.loads(text), SCHEMA)


def test_streamed_equals_whole_and_schema_as_text(pipe, photo_paths):
    whole = pipe.ask(photo_paths[1], "What is it?", max_tokens=256, json_schema=SCHEMA)
    pieces = list(pipe.ask(photo_paths[1], "What is it?", max_tokens=256, json_schema=json.dumps(SCHEMA),
                           stream=True))
    assert len(pieces) > 1 and "".join(pieces) == whole


def test_unconstrained_answers_are_not_json(pipe, photo_paths):
    """The control: without the grammar the tiny model writes no JSON, so the tests above measure it."""
    for photo in photo_paths[:4]:
        with pytest.raises(json.JSONDecodeError):
            json.loads(pipe.ask(photo, "Describe the picture.", max_tokens=32))


def test_gbnf_grammar(pipe, photo_paths):
    answers = {pipe.ask(p, "Is it a cat?", grammar='root ::= "yes" | "no"', temperature=1.0, seed=s)
               for p in photo_paths[:4] for s in range(3)}
    assert answers <= {"yes", "no"} and answers
    digits = pipe.ask(photo_paths[0], "How many?", grammar="root ::= [0-9]{3}", max_tokens=20)
    assert len(digits) == 3 and digits.isdigit()


def test_chat_turns_keep_working_after_a_grammar(pipe, photo_paths):
    plain = pipe.ask(photo_paths[2], "What is it?", max_tokens=8)
    pipe.ask(photo_paths[2], "What is it?", max_tokens=8, grammar='root ::= "no"')
    assert pipe.ask(photo_paths[2], "What is it?", max_tokens=8) == plain  # the grammar was per call


def test_errors(pipe, photo_paths):
    with pytest.raises(MraError, match="grammar"):
        pipe.ask(photo_paths[0], "x", grammar='root ::= "unterminated')
    with pytest.raises(MraError, match="both"):
        pipe.ask(photo_paths[0], "x", grammar='root ::= "a"', json_schema=SCHEMA)
    with pytest.raises(MraError, match="json_schema"):
        pipe.ask(photo_paths[0], "x", json_schema="{not json")
    assert pipe.ask(photo_paths[0], "x", max_tokens=2) is not None  # the Pipeline still answers


def test_integer_bounds_are_enforced(pipe, photo_paths):
    """llama-cpp-python's GBNF converter ignored minimum/maximum (a sampled answer once gave count
    7873610909908329 under maximum 20); llguidance enforces them, sampled or greedy."""
    bounded = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 20},
                                                "m": {"type": "integer", "minimum": -5, "maximum": -2}},
               "required": ["n", "m"], "additionalProperties": False}
    for seed in range(6):
        answer = json.loads(pipe.ask(photo_paths[seed % 4], "How many?", max_tokens=64, temperature=1.5, seed=seed,
                                     json_schema=bounded))
        jsonschema.validate(answer, bounded)


def test_mra_run_json_schema(tiny_bundle, photo_paths, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    args = ["--bundle", str(tiny_bundle), "--image", str(photo_paths[0]), "--prompt", "Describe it.",
            "--n-ctx", "2048", "--threads", "1", "--max-tokens", "256"]
    assert run_main([*args, "--json-schema", str(schema)]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMA)
    assert run_main([*args, "--json-schema", str(schema), "--json"]) == 0
    jsonschema.validate(json.loads(json.loads(capsys.readouterr().out)["answer"]), SCHEMA)
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert run_main([*args, "--json-schema", str(tmp_path / "bad.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mra-run: error: --json-schema") and len(err.splitlines()) == 1


def test_the_mask_allows_exactly_the_tokens_that_continue_the_grammar(pipe):
    """The reference is the vocabulary itself: a token may come first iff its bytes are a non-empty
    prefix of one of the grammar's answers; after "no", only EOS."""
    import numpy as np

    from mra.runtime.constraint import ConstraintCompiler, gbnf_grammar

    llm = pipe.llm
    state = ConstraintCompiler(llm.vocab).compile(gbnf_grammar('root ::= "yes" | "no"')).start()
    logits = np.zeros(llm.n_vocab, np.float32)
    state.mask(logits)
    pieces = [llm.token_bytes(t) for t in range(llm.n_vocab)]
    expected = {t for t, p in enumerate(pieces) if p and (b"yes".startswith(p) or b"no".startswith(p))}
    assert set(np.flatnonzero(np.isfinite(logits))) == expected and expected
    for t in [pieces.index(b"no")] if b"no" in pieces else [pieces.index(b"n"), pieces.index(b"o")]:
        state.accept(t)
    logits[:] = 0
    state.mask(logits)
    assert set(np.flatnonzero(np.isfinite(logits))) == {llm.eos}
    yes = ConstraintCompiler(llm.vocab).compile(gbnf_grammar('root ::= "yes"')).start()
    with pytest.raises(MraError, match="doesn't satisfy the grammar"):  # a token the mask would not allow
        yes.accept(pieces.index(b"n") if b"n" in pieces else pieces.index(b"no"))


def test_the_compile_limits_are_applied():
    from mra.core.errors import LimitExceeded
    from mra.runtime.constraint import ConstraintLimits, json_schema_grammar

    schema = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(40)}}
    json_schema_grammar(schema)
    with pytest.raises(MraError, match="grammar size"):
        json_schema_grammar(schema, ConstraintLimits(max_grammar_size=100))
    with pytest.raises(LimitExceeded, match="bound is 100"):
        json_schema_grammar(schema, ConstraintLimits(max_source_bytes=100))
    with pytest.raises(LimitExceeded, match="nested 3 deep, the bound is 2"):
        json_schema_grammar({"type": "array", "items": {"type": "array", "items": {}}}, ConstraintLimits(max_depth=2))
