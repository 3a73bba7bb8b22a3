"""Speaker embedding models (CAM++, ECAPA-TDNN) behind one `SpeakerEmbedder`, and `load_embedder`."""

from __future__ import annotations

from pathlib import Path

from .embedder import SpeakerEmbedder


def load_embedder(
    model_type: str,
    path: Path,
    *,
    device: str = "cpu",
    threads: int = 0,
    backend: str = "onnx",
    precision: str = "fp32",
) -> SpeakerEmbedder:
    """The configured embedder: CAM++ from its ONNX file (or the weights beside it on torch), ECAPA from its folder."""
    if model_type == "ecapa":
        from .ecapa import load_ecapa

        return load_ecapa(path, device=device, threads=threads, backend=backend, precision=precision)
    if model_type != "campplus":
        raise ValueError(f"speaker model must be campplus or ecapa, not {model_type!r}")
    from .campplus import CampplusEmbedder

    return CampplusEmbedder.load(path, device=device, threads=threads, backend=backend, precision=precision)


__all__ = ["SpeakerEmbedder", "load_embedder"]
