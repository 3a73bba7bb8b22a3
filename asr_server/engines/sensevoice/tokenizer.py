"""Token ids to text for SenseVoice: the sentencepiece model, or the token table beside a pre-exported ONNX.

The hubs' pre-exported SenseVoice (ModelScope `iic/SenseVoiceSmall-onnx`) ships `tokens.json`, the
list of pieces by id, and no sentencepiece model; FunASR's own C++ runtime decodes from that table.
`TokenTable` decodes it the way sentencepiece decodes the same pieces (`▁` starts a word, byte
pieces `<0xNN>` join into UTF-8, control pieces vanish), so both layouts give the same text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import sentencepiece as spm

from ...errors import ModelFileError
from ..contracts import SENSEVOICE_BPE as BPE_FILE
from ..contracts import SENSEVOICE_TOKENS as TOKENS_FILE

_CONTROL = frozenset({"<s>", "</s>", "<unk>", "<blank>", "<pad>"})
_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_WORD_START = "\u2581"


class Tokenizer(Protocol):
    """What the decoder needs: the vocabulary size and ids → text (tags kept as `<|…|>`)."""

    @property
    def size(self) -> int: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def piece(self, token_id: int) -> str: ...


class SentencePieceTokenizer:
    """The published sentencepiece model (`chn_jpn_yue_eng_ko_spectok.bpe.model`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise ModelFileError(f"cannot load {self.path}: {e}") from None

    @property
    def size(self) -> int:
        return int(self.processor.GetPieceSize())

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.processor.DecodeIds(list(ids)))

    def pieces(self) -> list[str]:
        return [self.processor.IdToPiece(i) for i in range(self.size)]

    def piece(self, token_id: int) -> str:
        return str(self.processor.IdToPiece(token_id))


class TokenTable:
    """`tokens.json`: a JSON list of pieces indexed by id (or `{"token_list": [...]}`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tokens = read_token_table(self.path)

    @property
    def size(self) -> int:
        return len(self.tokens)

    def piece(self, token_id: int) -> str:
        return self.tokens[token_id] if 0 <= token_id < len(self.tokens) else ""

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        pending = bytearray()
        for i in ids:
            piece = self.tokens[i] if 0 <= i < len(self.tokens) else ""
            byte = _BYTE.match(piece)
            if byte:
                pending.append(int(byte.group(1), 16))
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            if piece not in _CONTROL:
                out.append(piece)
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        text = "".join(out).replace(_WORD_START, " ")
        return text[1:] if text.startswith(" ") else text


def read_token_table(path: Path) -> list[str]:
    """The pieces of a `tokens.json`; a `ModelFileError` names what is wrong with the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelFileError(f"cannot read {path}: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("token_list"), list):
        data = data["token_list"]
    if not isinstance(data, list) or not data or not all(isinstance(t, str) for t in data):
        raise ModelFileError(f"{path}: not a token table (expected a JSON list of strings)")
    return data


def write_token_table(tokenizer: SentencePieceTokenizer, path: Path) -> None:
    """Write the pieces of a sentencepiece model as `tokens.json`, the layout the hubs publish."""
    Path(path).write_text(json.dumps(tokenizer.pieces(), ensure_ascii=False), encoding="utf-8")


def load_tokenizer(model_dir: Path) -> SentencePieceTokenizer | TokenTable:
    """The sentencepiece model when the folder has one, else its `tokens.json`."""
    model_dir = Path(model_dir)
    if (model_dir / BPE_FILE).is_file():
        return SentencePieceTokenizer(model_dir / BPE_FILE)
    if (model_dir / TOKENS_FILE).is_file():
        return TokenTable(model_dir / TOKENS_FILE)
    raise ModelFileError(f"{model_dir}: missing {BPE_FILE} (or the {TOKENS_FILE} of a pre-exported model)")
