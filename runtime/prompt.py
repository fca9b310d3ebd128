"""The LLaVA ``v1`` conversation and its tokenization, exactly as LLaVA-HR was trained.

The prompt text is what the reference ``conv_vicuna_v1.get_prompt()`` returns. Tokenization
follows the reference ``tokenizer_image_token`` with the legacy (slow) LLaMA tokenizer: the
text is split at each ``<image>`` marker, every chunk is encoded on its own (so each gets
SentencePiece's dummy-prefix space), the ``"</s>"`` that closes an earlier assistant turn is
the EOS token (HF splits special tokens out before SentencePiece, and the text after one gets
its own dummy prefix again), and BOS comes once, first.

The prompt is kept as parts (text, image slot, EOS) rather than one string, so that only the
template puts images and EOS into it: a user who types ``</s>`` or ``<image>`` gets those
characters, not a control token (the one place where the runtime differs from HF, which would
turn typed special-token text into the token). The tokenizer is passed in (llama.cpp's in the
runtime, SentencePiece in tests), so this module needs neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

from mra.core.errors import BadBundle, MraError
from mra.core.names import IMAGE_MARKER, ROLES, SEP, SEP2, SYSTEM_PROMPT


@dataclass(frozen=True)
class ImageSlot:
    """Where the ``index``-th image of the conversation goes (its N embeddings)."""
    index: int


class _Eos:
    """The template's turn separator ``"</s>"``: the EOS token."""

    def __repr__(self) -> str:
        return "EOS"


EOS = _Eos()
Part = Union[str, ImageSlot, _Eos]
# A tokenized prompt: token ids, and image slots that expand to N embedding rows each.
Unit = Union[int, ImageSlot]


@dataclass
class Template:
    """The conversation template (the bundle's ``prompt`` block); defaults are ``v1``."""
    system: str = SYSTEM_PROMPT
    roles: tuple[str, str] = ROLES
    sep: str = SEP
    sep2: str = SEP2
    image_marker: str = IMAGE_MARKER
    add_bos: bool = True

    @classmethod
    def from_manifest(cls, prompt: dict[str, Any]) -> "Template":
        if not isinstance(prompt, dict):
            raise BadBundle(f"manifest prompt | got {type(prompt).__name__}, expected an object; re-export the bundle")
        if prompt.get("template", "v1") != "v1":
            raise BadBundle(f"manifest prompt | template {prompt.get('template')!r}, expected 'v1'; "
                           "this runtime knows the LLaVA v1 conversation only")
        d = cls()
        t = cls(system=prompt.get("system", d.system), roles=prompt.get("roles", d.roles),
                sep=prompt.get("sep", d.sep), sep2=prompt.get("sep2", d.sep2),
                image_marker=prompt.get("image_marker", d.image_marker), add_bos=prompt.get("add_bos", True))
        texts = {"system": t.system, "sep": t.sep, "sep2": t.sep2, "image_marker": t.image_marker}
        bad = [k for k, v in texts.items() if not isinstance(v, str)]
        if not isinstance(t.roles, (list, tuple)) or len(t.roles) != 2 or not all(isinstance(r, str) for r in t.roles):
            bad.append("roles")
        if not isinstance(t.add_bos, bool):
            bad.append("add_bos")
        if bad:
            raise BadBundle(f"manifest prompt | malformed field(s) {', '.join(bad)}: expected strings, roles as two "
                           "strings and add_bos a boolean; re-export the bundle")
        t.roles = tuple(t.roles)
        return t


@dataclass
class Turn:
    role: str
    text: str | None  # None: the open assistant turn
    image: bool = False  # the image marker goes first ("<image>\n" + text), as LLaVA places it


@dataclass
class Conversation:
    template: Template = field(default_factory=Template)
    turns: list[Turn] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return sum(t.image for t in self.turns)

    @property
    def messages(self) -> list[tuple[str, str | None]]:
        """(role, text) pairs, the text with its marker, as the reference stores them."""
        m = self.template.image_marker
        return [(t.role, f"{m}\n{t.text}" if t.image and t.text is not None else t.text) for t in self.turns]

    def add_user(self, question: str, with_image: bool = False) -> None:
        question = check_text(question, "question")
        if self.turns and self.turns[-1].text is None:
            raise MraError("conversation | the previous assistant turn is still open; answer it first")
        self.turns += [Turn(self.template.roles[0], question, with_image), Turn(self.template.roles[1], None)]

    def set_answer(self, answer: str) -> None:
        if not self.turns or self.turns[-1].text is not None:
            raise MraError("conversation | no open assistant turn to answer")
        self.turns[-1].text = answer

    def drop_open_turn(self) -> None:
        """Undo an unanswered user turn (its generation failed, or its answer was never read)."""
        if self.turns and self.turns[-1].text is None:
            del self.turns[-2:]

    def parts(self) -> list[Part]:
        """The reference ``get_prompt()`` (separator style TWO) as text, image slots and EOS."""
        t = self.template
        out: list[Part] = [t.system + t.sep]
        images = 0
        for i, (turn, (role, message)) in enumerate(zip(self.turns, self.messages)):
            if not message:  # the reference treats "" like None: "ROLE:" and no separator
                out.append(f"{role}:")
                continue
            out.append(f"{role}: ")
            if turn.image:
                out += [ImageSlot(images), f"\n{turn.text}"]
                images += 1
            else:
                out.append(message)
            out.append(t.sep if i % 2 == 0 else EOS)
        return _merge_text(out)

    def prompt(self) -> str:
        """The prompt as one string, exactly the reference's text."""
        t = self.template
        return "".join(t.image_marker if isinstance(p, ImageSlot) else t.sep2 if p is EOS else p
                       for p in self.parts())


def check_text(text: object, what: str) -> str:
    """``text`` if it is a str that UTF-8 can encode: bytes, None or lone surrogates (a
    non-UTF-8 command line) would otherwise become wrong prompts or bare exceptions."""
    if not isinstance(text, str):
        hint = "; decode bytes first (text.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else ""
        raise MraError(f"{what} | got {type(text).__name__}, expected a str{hint}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MraError(f"{what} | not valid UTF-8 text: {e.reason} at character {e.start} "
                       f"({text[e.start:e.end]!r}); pass UTF-8 text") from None
    return text


def _merge_text(parts: list[Part]) -> list[Part]:
    out: list[Part] = []
    for p in parts:
        if isinstance(p, str) and out and isinstance(out[-1], str):
            out[-1] += p
        elif p != "":
            out.append(p)
    return out


def tokenize_parts(parts: list[Part], encode: Callable[[str], list[int]], bos: int, eos: int,
                   add_bos: bool = True) -> list[Unit]:
    """Token ids and image slots of a prompt, as ``tokenizer_image_token`` produces them.

    ``encode(text)`` must be SentencePiece's encode of one piece of text: dummy prefix, no
    BOS, special-token text kept literal.
    """
    units: list[Unit] = [bos] if add_bos else []
    for p in parts:
        if isinstance(p, str):
            units.extend(encode(p))
        elif p is EOS:
            units.append(eos)
        else:
            units.append(p)
    return units


def count_positions(units: list[Unit], num_image_tokens: int) -> int:
    """KV-cache positions a prompt takes: one per token, N per image."""
    return sum(num_image_tokens if isinstance(u, ImageSlot) else 1 for u in units)
