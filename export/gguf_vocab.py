"""The SentencePiece vocabulary of a LLaMA checkpoint, as llama.cpp's ``llama`` tokenizer
reads it from GGUF: pieces, scores, token types, special ids, and the two properties
llama.cpp cannot reproduce (text outside a vocabulary without byte fallback aborts the
process; SentencePiece's whitespace collapsing is not done), so the export can warn."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mra.runtime.errors import MraError

TOKENIZER_FILE = "tokenizer.model"
# sentencepiece_model.proto's SentencePiece.Type and gguf.TokenType share these numbers;
# named here so that the mapping is checked rather than assumed.
_PIECE_TYPES = ("NORMAL", "UNKNOWN", "CONTROL", "USER_DEFINED", "UNUSED", "BYTE")
BYTE_PIECES = tuple(f"<0x{b:02X}>" for b in range(256))


@dataclass
class SpmVocab:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]  # gguf.TokenType values
    n_pieces: int  # pieces in tokenizer.model; the rest is padding or added tokens
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_dummy_prefix: bool
    byte_fallback: bool  # all 256 <0xXX> byte pieces exist: every text is encodable
    collapses_whitespace: bool  # normalizer remove_extra_whitespaces: llama.cpp does not do it
    model_path: Path = field(default=Path())

    def warnings(self) -> list[str]:
        """Facts about this vocabulary that make llama.cpp differ from SentencePiece."""
        out = []
        if not self.byte_fallback:
            out.append(f"{self.model_path} | the vocabulary has no byte-fallback pieces (<0x00>..<0xFF>): llama.cpp "
                       "aborts the whole process on a character it cannot encode; apps must keep user text "
                       "within the vocabulary (manifest info.byte_fallback = false)")
        if self.collapses_whitespace:
            out.append(f"{self.model_path} | the tokenizer collapses repeated whitespace "
                       "(normalizer remove_extra_whitespaces) and llama.cpp does not: texts with whitespace runs "
                       "tokenize differently; collapse them before tokenizing (manifest info.collapses_whitespace)")
        return out


def read_spm_vocab(ckpt_dir: Path, n_vocab: int) -> SpmVocab:
    """Read ``tokenizer.model`` (and added_tokens.json / tokenizer_config.json), padded to
    ``n_vocab`` entries, the number of rows in the checkpoint's embedding matrix."""
    from gguf import TokenType
    from sentencepiece import sentencepiece_model_pb2 as pb

    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / TOKENIZER_FILE
    if not path.is_file():
        hint = " (only tokenizer.json is present: a fast tokenizer)" if (ckpt_dir / "tokenizer.json").is_file() else ""
        raise MraError(f"checkpoint {ckpt_dir} | no {TOKENIZER_FILE}{hint}: the GGUF needs the SentencePiece "
                       "vocabulary; copy tokenizer.model from the base LLM (e.g. lmsys/vicuna-7b-v1.5) into the "
                       "checkpoint folder")
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise MraError(f"{path} | not a SentencePiece model ({e})") from None
    if not proto.pieces:
        raise MraError(f"{path} | not a SentencePiece model: no pieces")
    n_pieces = len(proto.pieces)
    if n_pieces > n_vocab:
        raise MraError(f"{path} | {n_pieces} pieces, but config.json vocab_size is {n_vocab}: the tokenizer does "
                       "not belong to these weights")
    type_of = {pb.ModelProto.SentencePiece.Type.Value(n): int(getattr(TokenType, n)) for n in _PIECE_TYPES}

    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [type_of[p.type] for p in proto.pieces]
    _add_added_tokens(ckpt_dir, tokens, scores, types, n_vocab)
    for i in range(len(tokens), n_vocab):  # as llama.cpp's converter pads a short tokenizer
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED))

    piece_ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    byte_ok = all(piece_ids.get(b) is not None and types[piece_ids[b]] == TokenType.BYTE for b in BYTE_PIECES)
    ts = proto.trainer_spec
    cfg = _tokenizer_config(ckpt_dir)
    unk = ts.unk_id
    return SpmVocab(
        tokens=tokens, scores=scores, types=types, n_pieces=n_pieces,
        bos_id=ts.bos_id, eos_id=ts.eos_id, unk_id=unk, pad_id=ts.pad_id if ts.pad_id >= 0 else None,
        add_bos=bool(cfg.get("add_bos_token", True)), add_eos=bool(cfg.get("add_eos_token", False)),
        add_dummy_prefix=proto.normalizer_spec.add_dummy_prefix, byte_fallback=byte_ok,
        collapses_whitespace=proto.normalizer_spec.remove_extra_whitespaces, model_path=path)


def _tokenizer_config(ckpt_dir: Path) -> dict:
    p = ckpt_dir / "tokenizer_config.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise MraError(f"{p} | not valid JSON: {e}") from None


def _add_added_tokens(ckpt_dir: Path, tokens: list[bytes], scores: list[float], types: list[int],
                      n_vocab: int) -> None:
    """added_tokens.json ({text: id}) extends the vocabulary past the SentencePiece pieces."""
    from gguf import TokenType

    p = ckpt_dir / "added_tokens.json"
    if not p.is_file():
        return
    try:
        added = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise MraError(f"{p} | not valid JSON: {e}") from None
    for text, tid in sorted(added.items(), key=lambda kv: kv[1]):
        if tid < len(tokens):
            if tokens[tid] != text.encode("utf-8"):
                raise MraError(f"{p} | token {text!r} has id {tid}, which is piece {tokens[tid].decode()!r} "
                               "in tokenizer.model")
            continue
        if tid != len(tokens) or tid >= n_vocab:
            raise MraError(f"{p} | token {text!r} has id {tid}, expected {len(tokens)} (next free id, "
                           f"below vocab_size {n_vocab})")
        tokens.append(text.encode("utf-8"))
        scores.append(-1000.0)
        types.append(int(TokenType.USER_DEFINED))
