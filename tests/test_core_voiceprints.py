import numpy as np
import pytest

from asr_server.core.voiceprints import VoiceprintStore
from asr_server.errors import VoiceprintError


def unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_enroll_identify_threshold_and_remove(tmp_path):
    store = VoiceprintStore(tmp_path / "vp.sqlite", model="m", dim=3)
    store.enroll("alice", [[1, 0, 0], [0.9, 0.1, 0]])
    store.enroll("bob", [[0, 1, 0]])
    match = store.identify(unit([1, 0.05, 0]), threshold=0.5)
    assert match is not None and match.name == "alice" and match.score > 0.95
    assert store.identify(unit([0, 0, 1]), threshold=0.5) is None  # unknown below threshold
    assert store.identify(unit([1, 0, 0]), threshold=0.5, names=["bob"]) is None
    assert [v.name for v in store.list()] == ["alice", "bob"]
    assert store.get("alice").samples == 2
    assert store.remove("bob") and not store.remove("bob")
    assert list(store.scores(unit([0, 1, 0]))) == ["alice"]
    store.close()


def test_another_connection_sees_enrollment(tmp_path):
    a = VoiceprintStore(tmp_path / "vp.sqlite", model="m", dim=2)
    b = VoiceprintStore(tmp_path / "vp.sqlite", model="m", dim=2)
    assert b.identify(unit([1, 0]), 0.1) is None
    a.enroll("carol", [[1, 0]])
    assert b.identify(unit([1, 0]), 0.1).name == "carol"
    a.close(), b.close()


def test_bad_input(tmp_path):
    store = VoiceprintStore(tmp_path / "vp.sqlite", model="m", dim=3)
    with pytest.raises(VoiceprintError, match="3"):
        store.enroll("x", [[1, 0]])
    with pytest.raises(VoiceprintError, match="name"):
        store.enroll("  ", [[1, 0, 0]])
    with pytest.raises(VoiceprintError, match="zero"):
        store.enroll("x", [[0, 0, 0]])
    with pytest.raises(VoiceprintError, match="no voiceprint"):
        store.get("nobody")
    store.close()
