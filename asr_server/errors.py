"""Every error the server raises on purpose, under one root.

A user-caused error reaches the user as one line naming its cause (the CLI prints it and exits
2; the traceback goes to the log at DEBUG); a client-caused error reaches that client as an
error message or close reason and leaves every other session alone. Classes that were
`ValueError`s or `RuntimeError`s keep that base too, so `except ValueError` still catches them.

    AsrServerError
    ├── ConfigError                 config.yaml, environment or command-line value that is invalid
    ├── StartupError                the server cannot start (a port in use, models missing)
    ├── ModelFileError              a model file is missing, truncated or of the wrong signature
    │   └── CmvnFileError           am.mvn without its <AddShift>/<Rescale> vectors
    ├── ModelsError                 a `models` command could not do what it was asked
    │   ├── HubUnreachableError     the hub did not answer; nothing was downloaded
    │   ├── MissingDependencyError  a package this step needs is not installed
    │   ├── DownloadError           a download started but did not finish (run pull again)
    │   └── ExportError             PyTorch weights could not be turned into ONNX
    ├── BackendUnavailableError     the torch backend cannot run here (no torch, no such GPU)
    ├── UnsupportedLanguage         a language SenseVoice has no query for
    ├── EngineClosed                an engine's queue was closed while a request waited
    ├── EngineBusy                  an engine's queue is at its limit: the request is refused, not queued
    ├── EngineFailed                a remote engine (a Ray Serve replica) died or did not answer in time
    ├── SubscriptionClosed          the event bus closed (shutdown) under a subscriber
    ├── VoiceprintError             bad speaker name, dimension mismatch, unknown speaker
    ├── AudioError                  audio the server cannot use
    │   ├── AudioDecodeError        bytes that no decoder reads as audio
    │   │   ├── EmptyAudioError     no bytes, or no samples in the container
    │   │   ├── AudioTooLongError   longer than the caller allows
    │   │   ├── AudioFormatError    a header with channels or a sample rate out of bounds
    │   │   ├── DecoderCrashed      the decoder's worker process died on the file (a native crash)
    │   │   └── PcmFormatError      raw PCM16 that is not a whole number of samples
    │   └── OpusDecodeError         an Opus packet libopus rejects
    ├── ProtocolError               a client broke a wire protocol; the text is fit to send back
    │   ├── FramingError            xiaozhi: a binary frame whose header is malformed
    │   ├── MessageError            xiaozhi: JSON that is invalid, lacks a field, has an unknown type
    │   └── FunAsrProtocolError     FunASR: carries the WebSocket close code that says how
    ├── ClientGone                  the client left mid-request (also a ConnectionError)
    ├── UpstreamError               the upstream chatbot server refused, is down, or sent no hello
    └── ApiError                    an HTTP request the API refuses, with its status
"""

from __future__ import annotations


class AsrServerError(Exception):
    """The root: anything the server raises on purpose, with a message fit for the person who caused it."""


class ConfigError(AsrServerError, ValueError):
    """The configuration is invalid; the message names each bad key and why."""


class StartupError(AsrServerError, RuntimeError):
    """The server cannot start (missing models, port in use); the message says what to do."""


class ModelFileError(AsrServerError, RuntimeError):
    """A model file is missing, truncated or of the wrong signature."""


class CmvnFileError(ModelFileError, ValueError):
    """`am.mvn` is missing its `<AddShift>`/`<Rescale>` vectors or they disagree in size."""


class ModelsError(AsrServerError, RuntimeError):
    """A models command could not do what it was asked; the message says why and what to do."""


class HubUnreachableError(ModelsError):
    """The hub did not answer the connectivity probe; nothing was downloaded."""


class MissingDependencyError(ModelsError):
    """A package needed for this step (hub client, torch, funasr, speechbrain) is not installed."""


class DownloadError(ModelsError):
    """A download started but did not finish; running `pull` again resumes it."""


class ExportError(ModelsError):
    """PyTorch weights could not be turned into ONNX (the message says which step failed)."""


class BackendUnavailableError(AsrServerError, RuntimeError):
    """The torch backend was asked for but cannot run here (torch/funasr missing, no such GPU)."""


class UnsupportedLanguage(AsrServerError, ValueError):
    """A language SenseVoice has no query for."""


class EngineClosed(AsrServerError, RuntimeError):
    """The engine's batcher was closed while a request was waiting."""


class EngineAborted(AsrServerError, RuntimeError):
    """A computation was stopped because every caller waiting for it was gone (a discarded speculation)."""


class EngineBusy(AsrServerError, RuntimeError):
    """The engine's queue holds its limit of waiting requests; the message names the config key."""


class EngineFailed(AsrServerError, RuntimeError):
    """A remote engine failed one request: its Ray Serve replica died under it, or no answer came within
    `inference.request_timeout_s`. Only the requests that replica held fail; the next one goes to a
    live (or restarted) replica."""


class SubscriptionClosed(AsrServerError):
    """The event bus closed (server shutdown) or the subscription was cancelled."""


class VoiceprintError(AsrServerError, ValueError):
    """A voiceprint operation that cannot be done (bad name, dimension mismatch, unknown speaker)."""


class HotwordError(AsrServerError, ValueError):
    """A hotword list or correction rule that cannot be used: too many, too long, a weight that is not a number."""


class AudioError(AsrServerError, ValueError):
    """Audio the server cannot use."""


class AudioDecodeError(AudioError):
    """The bytes are not audio that either decoder can read."""


class EmptyAudioError(AudioDecodeError):
    """The input holds no samples (an empty file, or a container with no audio in it)."""


class AudioTooLongError(AudioDecodeError):
    """The decoded audio is longer than the caller allows."""


class AudioFormatError(AudioDecodeError):
    """The header says more channels, or a sample rate further out, than any speech recording has."""


class DecoderCrashed(AudioDecodeError):
    """The worker process decoding the file died (a native crash in FFmpeg or libsndfile, or it ran
    past its time); only this file's request fails."""


class PcmFormatError(AudioDecodeError):
    """Raw PCM16 whose byte count is not a whole number of samples."""


class OpusDecodeError(AudioError):
    """A packet libopus rejects (corrupt or not Opus)."""


class ProtocolError(AsrServerError):
    """A message the protocol does not allow; the text is sent to the client as is."""


class FramingError(ProtocolError):
    """A binary message whose header is malformed or disagrees with its payload."""


class MessageError(ProtocolError):
    """A JSON message that is not valid JSON, lacks a field or has an unknown type."""


class FunAsrProtocolError(ProtocolError):
    """A FunASR client broke the protocol; `code` is the WebSocket close code that says how."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class ClientGone(AsrServerError, ConnectionError):
    """The client left in the middle of its request: nobody to answer, nothing failed here."""


class UpstreamError(AsrServerError):
    """The upstream chatbot server refused the device, is down, or sent no hello in time."""


class ApiError(AsrServerError):
    """A request the HTTP API refuses; rendered in the endpoint family's error shape."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
