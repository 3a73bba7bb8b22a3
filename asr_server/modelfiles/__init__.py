"""Model files on disk: where they go (`layout`), what was fetched (`manifest`), whether the engines can
use them (`inspect`), fetching them (`hub`) and turning PyTorch weights into ONNX (`export`)."""
