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

    @property
    def unk_id(self) -> int: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def piece(self, token_id: int) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def piece_id(self, piece: str) -> int | None: ...


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

    @property
    def unk_id(self) -> int:
        return int(self.processor.unk_id())

    def pieces(self) -> list[str]:
        return [self.processor.IdToPiece(i) for i in range(self.size)]

    def piece(self, token_id: int) -> str:
        return str(self.processor.IdToPiece(token_id))

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.processor.EncodeAsIds(text)]

    def piece_id(self, piece: str) -> int | None:
        tid = int(self.processor.PieceToId(piece))
        return None if tid == self.unk_id and piece != self.piece(tid) else tid


class TokenTable:
    """`tokens.json`: a JSON list of pieces indexed by id (or `{"token_list": [...]}`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tokens = read_token_table(self.path)
        self._ids = {t: i for i, t in reversed(list(enumerate(self.tokens)))}
        self._longest = max(len(t) for t in self.tokens)

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def unk_id(self) -> int:
        return self._ids.get("<unk>", 0)

    def piece(self, token_id: int) -> str:
        return self.tokens[token_id] if 0 <= token_id < len(self.tokens) else ""

    def piece_id(self, piece: str) -> int | None:
        return self._ids.get(piece)

    def encode(self, text: str) -> list[int]:
        """Longest pieces first, left to right (the table has no merge rules, so not always the
        sentencepiece model's own split); a character no piece covers is `unk_id`."""
        s = _WORD_START + _WORD_START.join(text.split())
        out: list[int] = []
        i = 0
        while i < len(s):
            for n in range(min(self._longest, len(s) - i), 0, -1):
                tid = self._ids.get(s[i : i + n])
                if tid is not None and tid != self.unk_id:
                    out.append(tid)
                    i += n
                    break
            else:
                out.append(self.unk_id)
                i += 1
        return out

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
