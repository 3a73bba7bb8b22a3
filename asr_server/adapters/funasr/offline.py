"""An offline request's audio (`mode: offline`): held whole until `is_speaking: false`, as the
client sends it: a file's bytes (`wav_format` other than pcm) or PCM samples, already resampled
to 16 kHz. It stays within the request's limits (`funasr.max_message_bytes` for a file,
`funasr.max_audio_s` for PCM) and counts against the server's `BufferBudget` until it is taken
or the connection ends; a file is decoded in the server's decoder processes when taken."""

from __future__ import annotations

import numpy as np
from websockets.frames import CloseCode

from ...audio.resample import PcmResampler
from ...constants import SAMPLE_RATE
from ...errors import AudioDecodeError, DecoderCrashed, FunAsrProtocolError
from .context import FunAsrContext


class OfflineAudio:
    """The audio of the offline request in progress, and the bytes of it the budget counts."""

    def __init__(self, ctx: FunAsrContext) -> None:
        self._ctx = ctx
        self._pcm: list[np.ndarray] = []
        self._samples = 0
        self._file: list[bytes] = []
        self._file_bytes = 0
        self._held = 0  # bytes counted in the server's `BufferBudget`

    def __bool__(self) -> bool:
        return bool(self._pcm or self._file)

    def add_file(self, data: bytes) -> None:
        """A piece of an audio file (any container the decoder reads)."""
        self._file_bytes += len(data)
        if self._file_bytes > self._ctx.config.max_message_bytes:
            raise FunAsrProtocolError(CloseCode.MESSAGE_TOO_BIG, "audio file larger than funasr.max_message_bytes")
        self._hold(len(data))
        self._file.append(data)

    def add_pcm(self, pcm: np.ndarray) -> None:
        """16 kHz samples of PCM the client sent."""
        self._samples += len(pcm)
        max_audio_s = self._ctx.config.max_audio_s
        if self._samples > max_audio_s * SAMPLE_RATE:
            raise FunAsrProtocolError(
                CloseCode.MESSAGE_TOO_BIG, f"audio longer than funasr.max_audio_s ({max_audio_s:g} s)"
            )
        self._hold(pcm.nbytes)
        self._pcm.append(pcm)

    async def take(self, wav_format: str, resampler: PcmResampler) -> np.ndarray:
        """The request's audio as 16 kHz samples (a file decoded; PCM with the resampler's last
        samples), and nothing held any more."""
        if self._file:
            try:
                data = b"".join(self._file)
                audio = (await self._ctx.decoder.decode(data, self._ctx.config.max_audio_s)).samples
            except AudioDecodeError as e:  # DecoderCrashed included: a decoder process died on it
                if isinstance(e, DecoderCrashed):
                    self._ctx.metrics.errors.labels("decoder_crashed").inc()
                raise FunAsrProtocolError(CloseCode.INVALID_DATA, f"wav_format {wav_format!r}: {e}") from None
        else:
            tail = resampler.push(b"", last=True)
            audio = np.concatenate([*self._pcm, tail]) if self._pcm else tail
        self._pcm, self._file = [], []
        self._samples = self._file_bytes = 0
        self.release()
        return audio

    def release(self) -> None:
        """Give the budget back what is held (the connection ended)."""
        self._ctx.buffers.give_back(self._held)
        self._held = 0

    def _hold(self, nbytes: int) -> None:
        buffers = self._ctx.buffers
        if not buffers.take(nbytes):
            self._ctx.metrics.errors.labels("funasr_buffer_full").inc()
            raise FunAsrProtocolError(
                CloseCode.TRY_AGAIN_LATER,
                f"the server holds {buffers.held / 2**20:.0f} MB of offline audio "
                "(funasr.max_buffered_mb); send it again later",
            )
        self._held += nbytes
