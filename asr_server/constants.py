"""Facts every layer shares, defined once: the audio format, the VAD window, languages, protocol names."""

from __future__ import annotations

from typing import Final, Literal

#: Every engine runs on 16 kHz mono float32 in [-1, 1]; adapters resample to it at the edge.
SAMPLE_RATE: Final = 16000

#: Silero VAD reads 512 new samples (32 ms at 16 kHz) with the previous 64 as context.
VAD_WINDOW: Final = 512
VAD_CONTEXT: Final = 64
VAD_WINDOW_MS: Final = VAD_WINDOW * 1000 / SAMPLE_RATE

#: The languages SenseVoice-Small recognises (`auto` detects; `nospeech` is its no-speech query).
Language = Literal["auto", "zh", "en", "yue", "ja", "ko", "nospeech"]
LANGUAGES: Final[tuple[str, ...]] = ("auto", "zh", "en", "yue", "ja", "ko", "nospeech")

#: The protocols whose sessions the server counts and whose transcripts become events.
Protocol = Literal["xiaozhi", "funasr", "openai"]
XIAOZHI: Final = "xiaozhi"
FUNASR: Final = "funasr"
OPENAI: Final = "openai"
