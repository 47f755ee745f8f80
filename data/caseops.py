"""CaseOps: a lossless case transform applied to text before tokenizing.

ASCII letters are lowercased and their case is carried by operator characters from the
Unicode private-use area, so a tokenizer spends no pieces on case variants ("The", "THE",
"the" share one piece). The scheme follows the CaseOps records (PR #1729, lossless_caps
caseops v1): four operators, each a single character that the tokenizer keeps as its own
piece (a SentencePiece user-defined symbol).

    TITLE   U+E001  the next ASCII word is capitalized:       "Hello" -> TITLE "hello"
    ALLCAPS U+E002  the next ASCII word is all capitals:      "NASA"  -> ALLCAPS "nasa"
    CAPNEXT U+E003  the next ASCII letter is a capital:       "iPhone" -> "i" CAPNEXT "phone"
    ESC     U+E004  the next character is literal (operator characters in the input)

A word is a maximal run of ASCII letters [A-Za-z]. Everything else (digits, non-ASCII letters,
combining marks) passes through unchanged, so lowercasing never changes a UTF-8 byte count.

``decode(encode(text)) == text`` for every string. ``decode`` is total: on text that
``encode`` cannot produce (what a tokenizer's normalization or a sampler may leave), an
operator with nothing to act on is dropped and the rest passes through, so operator
characters never count as text bytes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
NAME = "caseops_v1"

# Words with a capital only; all-lowercase words pass through untouched.
_WORD = re.compile(r"(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*")
_ESCAPE = {ord(op): ESC + op for op in OPERATORS}
# One left-to-right scan, so an escaped operator is never read as an operator.
_OPS = re.compile("\ue004(.?)|([\ue001\ue002])([a-z]*)|\ue003([a-z]?)", re.DOTALL)


def _encode_word(m: re.Match) -> str:
    w = m.group()
    if len(w) > 1 and w.isupper():
        return ALLCAPS + w.lower()
    if w[0].isupper() and (len(w) == 1 or w[1:].islower()):
        return TITLE + w.lower()
    return "".join(CAPNEXT + c.lower() if c.isupper() else c for c in w)


def encode(text: str) -> str:
    """The transformed text: literal operator characters escaped, ASCII case moved into operators."""
    return _WORD.sub(_encode_word, text.translate(_ESCAPE))


def _decode_op(m: re.Match) -> str:
    lit, op, word, letter = m.groups()
    if lit is not None:
        return lit
    if op == TITLE:
        return word[:1].upper() + word[1:]
    if op == ALLCAPS:
        return word.upper()
    return letter.upper()


def decode(text: str) -> str:
    """The exact inverse of encode (and total on any string: dangling operators are dropped)."""
    return _OPS.sub(_decode_op, text)


# ------------------------------------------------------------------------------------------------
# Bytes of the original text per token (the validation byte sidecar)
# ------------------------------------------------------------------------------------------------


class PieceBytes:
    """Per-id tables to count, for each token, the UTF-8 bytes it adds to decode(sp.decode(ids)).

    Operator pieces add nothing, except an operator piece right after an unconsumed ESC, which is a
    literal character (3 bytes). Control pieces (BOS, ...) add nothing, byte-fallback pieces 1 byte,
    other pieces their text with the leading "▁" as one space, which sp.decode drops on a document's
    first piece.
    """

    def __init__(self, sp):
        n = sp.vocab_size()
        self.ops = [sp.piece_to_id(op) for op in OPERATORS]
        if any(i == sp.unk_id() for i in self.ops):
            raise ValueError("the tokenizer has no CaseOps operator pieces; train it with data/train_tokenizer.py --caseops")
        self.esc = self.ops[-1]
        self.base = np.zeros(n, dtype=np.int64)
        self.lead = np.zeros(n, dtype=bool)
        self.is_op = np.zeros(n, dtype=bool)
        self.is_op[self.ops] = True
        for i in range(n):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or self.is_op[i]:
                continue
            if sp.is_byte(i):
                self.base[i] = 1
                continue
            piece = sp.id_to_piece(i)
            self.lead[i] = piece.startswith("\u2581")
            self.base[i] = len(piece.replace("\u2581", " ").encode("utf-8"))

    def doc_counts(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Byte count of each token of one document's ids (without BOS)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = self.base[ids]
        if ids.size and self.lead[ids[0]]:
            out[0] -= 1
        escaped = False
        for k in np.flatnonzero(self.is_op[ids]).tolist():
            if escaped and k > 0 and ids[k - 1] == self.esc:
                out[k] = 3  # a literal operator character: U+E001..U+E004 are 3 UTF-8 bytes
                escaped = False
            else:
                escaped = ids[k] == self.esc
        return out
