"""One live stream's speech detection: energy gate → Silero VAD state → segmenter, in one object.

Every adapter that streams audio (the xiaozhi device socket, FunASR's online and 2pass modes, a
recording cut into utterances) runs the same loop through a `SpeechStream` the pipeline hands
out: the stream frames its audio into 32 ms windows, skips the model for windows below the energy
gate (cheap work first), takes each window's speech probability and recurrent state, and feeds the
probability to its segmenter, which says where utterances start, may end, and end. The pipeline
runs the model; only the stream changes its own state.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from ..audio.segmenter import Event, Segmenter, SegmenterOptions
from ..config import VadConfig
from ..engines.vad import VadStream


def segmenter_options(cfg: VadConfig, phrases: bool = False) -> SegmenterOptions:
    """The segmenter's options from the `vad` section of the configuration (the keys of the same
    names); without `phrases`, utterances are whole (phrase_pause_ms 0)."""
    options = SegmenterOptions(
        **{f.name: getattr(cfg, f.name) for f in fields(SegmenterOptions) if hasattr(cfg, f.name)}
    )
    return options if phrases else replace(options, phrase_pause_ms=0.0)


def rms_dbfs(chunk: np.ndarray) -> float:
    """Level of a float chunk in dBFS, for the energy gate in front of the VAD."""
    power = float(np.mean(np.square(chunk, dtype=np.float64))) if len(chunk) else 0.0
    return 10.0 * float(np.log10(power)) if power > 1e-20 else -200.0


@dataclass(slots=True)
class Window:
    """One 512-sample chunk of a stream and its model input (64 context samples + the chunk), or
    None when the chunk is below the energy gate and the model is skipped."""

    chunk: np.ndarray
    samples: np.ndarray | None


class SpeechStream:
    """Energy gate, VAD framing and state, and segmenter of one stream. Not shared between streams."""

    def __init__(self, options: SegmenterOptions, gate_dbfs: float) -> None:
        self.options = options
        self.gate_dbfs = gate_dbfs
        # The gate compares mean power, which is cheaper than dBFS: 10·log10(p) < gate ⇔ p < 10^(gate/10).
        self._gate_power = 10.0 ** (gate_dbfs / 10.0)
        self.vad = VadStream()
        self.segmenter = Segmenter(options)

    def windows(self, pcm: np.ndarray) -> list[Window]:
        """Frame new samples into the windows now complete, each gated by its level (in one array op)."""
        block = self.vad.push_block(pcm)
        if not block.shape[0]:
            return []
        inputs = self.vad.inputs(block)
        power = np.einsum("ij,ij->i", block, block, dtype=np.float64) / block.shape[1]
        loud = power >= self._gate_power
        return [Window(block[i], inputs[i] if loud[i] else None) for i in range(block.shape[0])]

    def advance(self, state: np.ndarray) -> None:
        """Take the recurrent state the model returned for this stream's last window."""
        self.vad.advance(state)

    def push(self, chunk: np.ndarray, prob: float) -> list[Event]:
        """One window's speech probability into the segmenter; the events it causes."""
        return self.segmenter.push(chunk, prob)

    def is_voiced(self, prob: float) -> bool:
        return prob >= self.options.threshold

    def flush(self) -> Event | None:
        """End the utterance in progress now (listen stop, end of input); None when there is none."""
        return self.segmenter.flush()

    def reset(self) -> None:
        """Forget the utterance in progress and the VAD's memory (abort, listen start)."""
        self.segmenter.reset()
        self.vad.reset()

    @property
    def in_speech(self) -> bool:
        return self.segmenter.in_speech

    @property
    def windows_fed(self) -> int:
        return self.segmenter.windows_fed

    def audio_so_far(self) -> np.ndarray:
        return self.segmenter.audio_so_far()
