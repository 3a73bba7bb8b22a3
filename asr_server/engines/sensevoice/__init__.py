"""SenseVoice-Small: the engine (`model`), its decoding and tokenizer, and its two runtimes (`onnx`, `torch`)."""

from .decoding import LANGUAGE_IDS, TEXTNORM_IDS, ctc_greedy, language_id, parse_transcript
from .model import SenseVoice, SenseVoiceRuntime, select_model_file

__all__ = [
    "LANGUAGE_IDS",
    "TEXTNORM_IDS",
    "SenseVoice",
    "SenseVoiceRuntime",
    "ctc_greedy",
    "language_id",
    "parse_transcript",
    "select_model_file",
]
