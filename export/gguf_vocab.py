"""The SentencePiece vocabulary of a LLaMA checkpoint, as llama.cpp's ``llama`` tokenizer
reads it from GGUF: pieces, scores, token types, special ids, and the two properties
llama.cpp cannot reproduce (text outside a vocabulary without byte fallback aborts the
process; SentencePiece's whitespace collapsing is not done), so the export can warn."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mra.core.errors import MraError

TOKENIZER_FILE = "tokenizer.model"
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
    """Read ``tokenizer.model`` with gguf-py's ``SentencePieceVocab`` (pieces, scores, types,
    added_tokens.json) and ``SpecialVocab`` (special ids and add-BOS/EOS from config.json and
    tokenizer_config.json, as llama.cpp's converter reads them), padded to ``n_vocab`` entries,
    the number of rows in the checkpoint's embedding matrix."""
    from gguf import SentencePieceVocab, SpecialVocab, TokenType
    from sentencepiece import sentencepiece_model_pb2 as pb

    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / TOKENIZER_FILE
    if not path.is_file():  # checked here: SentencePieceVocab would also look in the parent folder
        hint = " (only tokenizer.json is present: a fast tokenizer)" if (ckpt_dir / "tokenizer.json").is_file() else ""
        raise MraError(f"checkpoint {ckpt_dir} | no {TOKENIZER_FILE}{hint}: the GGUF needs the SentencePiece "
                       "vocabulary; copy tokenizer.model from the base LLM (e.g. lmsys/vicuna-7b-v1.5) into the "
                       "checkpoint folder")
    try:
        spv = SentencePieceVocab(ckpt_dir)
        proto = pb.ModelProto.FromString(spv.sentencepiece_tokenizer.serialized_model_proto())
        special = SpecialVocab(ckpt_dir, n_vocab=n_vocab, special_token_types=("bos", "eos", "unk", "pad"))
    except json.JSONDecodeError as e:
        raise MraError(f"{ckpt_dir} | added_tokens.json, config.json or tokenizer_config.json is not valid JSON: "
                       f"{e}") from None
    except ValueError as e:  # added_tokens.json ids not following the pieces
        raise MraError(f"{ckpt_dir / 'added_tokens.json'} | {e}: added tokens must take the ids after the "
                       "tokenizer.model pieces, in order") from None
    except Exception as e:  # sentencepiece's OSError / RuntimeError on a damaged file
        raise MraError(f"{path} | not a SentencePiece model ({e})") from None
    if spv.vocab_size > n_vocab:  # pieces + added tokens
        raise MraError(f"{path} | {spv.vocab_size} tokens, but config.json vocab_size is {n_vocab}: the tokenizer "
                       "does not belong to these weights")
    tokens, scores, types = (list(x) for x in zip(*spv.all_tokens()))
    types = [int(t) for t in types]
    # gguf-py leaves USER_DEFINED pieces NORMAL; llama.cpp matches them as whole text, so keep the proto's type.
    for i, p in enumerate(proto.pieces):
        if p.type == pb.ModelProto.SentencePiece.USER_DEFINED:
            types[i] = int(TokenType.USER_DEFINED)
    for i in range(len(tokens), n_vocab):  # as llama.cpp's converter pads a short tokenizer
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED))

    ids, add = special.special_token_ids, special.add_special_token
    ts = proto.trainer_spec  # what SpecialVocab does not find: the tokenizer's own ids
    byte_ids = [spv.sentencepiece_tokenizer.PieceToId(b) for b in BYTE_PIECES]
    byte_ok = all(spv.sentencepiece_tokenizer.IsByte(i) for i in byte_ids)
    return SpmVocab(
        tokens=tokens, scores=scores, types=types, n_pieces=spv.vocab_size_base,
        bos_id=ids.get("bos", ts.bos_id), eos_id=ids.get("eos", ts.eos_id), unk_id=ids.get("unk", ts.unk_id),
        pad_id=ids.get("pad", ts.pad_id if ts.pad_id >= 0 else None),
        add_bos=add.get("bos", True), add_eos=add.get("eos", False),
        add_dummy_prefix=proto.normalizer_spec.add_dummy_prefix, byte_fallback=byte_ok,
        collapses_whitespace=proto.normalizer_spec.remove_extra_whitespaces, model_path=path)
