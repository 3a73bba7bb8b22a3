"""The overload governor: whether one more connection may come in (`admit`), and whom to close
when the ones in already ask for more than the box answers in budget (`shed`).

One question decides both: would an answer miss `asr.budget_ms` (end of speech → reply)? Two
signals answer it, on every port (the device socket, the FunASR socket, transcriptions):

- **the recogniser**: more than `LATE_SHARE` of the last seconds' device replies came after the
  budget (`LateReplies`), or its next job has waited past the slack (below), or its load
  (`core.utilisation`: its lanes' busy share, queued work included) is past `MAX_LOAD`, the load
  past which the next devices' replies were measured late before any reply showed it;
- **the front end**: the streaming devices' live audio reaches the VAD past the slack after it
  was spoken (more than `LATE_SHARE` of them, `MIN_LATE_STREAMS` at least): the loop reads
  slower than they speak, and every reply of theirs is late by that much.

The slack is derived, not set: `asr.budget_ms` minus `vad.min_silence_ms`, what the budget leaves
after the silence that ends an utterance. A final waits for that silence and then for the queue,
the input delay and its compute; a queue wait or an input delay past the slack makes its reply
late whatever the compute. The operator's knobs are the budget and each port's `max_sessions`
(the adapters count those); `asr.budget_ms: 0` turns the governor off.

A device woken by its user is a person waiting: the firmware never retries a refused connect, so
a refusal is an error they hear. There is no slow start and no learned cap on the session count
(a woken fleet's sessions mostly listen to silence: their count says nothing of the load); a
device is refused only while one of the signals says its answers would be late. Shedding closes
the newest devices while the server stays behind although it refuses new ones (a burst of talking
let in before its load showed), one round per `SHED_AFTER_S`, each judged only on what came after
the last (`ShedRound`). BENCHMARKS.md and docs/reliability.md hold the measurements behind each
constant; one governor serves one process (its recogniser and its event loop).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

#: The share of late replies (and of late-reading devices) that means behind. BENCHMARKS.md
#: ("`asr.late_share` 0.05 against 0.1"): 0.05 was steadier in a soak of continuous talkers but
#: worse in two cold waves, so the measured default stayed 0.1.
LATE_SHARE = 0.1

#: The lateness window: the replies of the last 5 s, or, where fewer came (a few devices on a slow
#: CPU answer less than one a second), the last `MIN_REPLIES` of the last 30 s; at least
#: 1 / LATE_SHARE of them, so one slow utterance alone never means behind (BENCHMARKS.md, "A cold
#: mass connect, and few slow replies": 5 s alone never saw 6 devices on one core late).
WINDOW_S = 5.0
MIN_REPLIES = max(10, math.ceil(1 / LATE_SHARE - 1e-9))
MAX_AGE_S = 30.0

#: The recogniser's load past which a new device is refused although every reply is still in
#: budget: the load rises with the talking devices long before a reply is late, the replies only
#: after. Full-size SenseVoice on 2 cores (BENCHMARKS.md, "3x the recogniser's capacity"): 0.55
#: held the admitted devices' p95 at 629-695 ms, 0.7 at the budget's edge (739-787 ms).
MAX_LOAD = 0.55

#: How long the server must stay behind, while refusing, before a round of shedding; and the share
#: of the open sessions one round closes (BENCHMARKS.md, "Overload": one session per 3 s left
#: p95 at 3.4 s, 10 % a second at 1.9 s and with the rounds judged after the last under 800 ms).
SHED_AFTER_S = 1.0
SHED_FRACTION = 0.1

#: Fewer streaming devices than this never saturate a loop: their input delay is noise (a GC
#: pause); and one late device alone is its own network, so at least `MIN_LATE_STREAMS` are late.
MIN_STREAMS = 10
MIN_LATE_STREAMS = 2

#: A device let in this recently that has not been answered yet is still saying its first
#: utterance: its load is not in the recogniser's yet, and will be within seconds (the shared
#: clips' speech ends 3.5-11 s after the connect). One that said nothing for longer listens to
#: silence and brings no load.
UNHEARD_S = 10.0

#: An input delay that shrinks by this much a sweep or more is being caught up with: shedding for it
#: would close devices the box can serve (the live feed reads on during a slow VAD call).
DRAINING_S = 0.05


class Recogniser(Protocol):
    """What the governor reads of the recogniser's scheduler (`core.scheduler.InferenceQueue`)."""

    def head_wait(self) -> float: ...

    def load(self) -> float: ...

    def call_load(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class ShedRound:
    """When the last round of shedding was (`time.monotonic`) and how long the recogniser's next
    job had waited then: the next round needs evidence from after it."""

    at: float
    wait_s: float


@dataclass(frozen=True, slots=True)
class Shed:
    """A round of shedding: close the `count` newest sessions, telling them `why`."""

    count: int
    why: str


class LateReplies:
    """The device replies of the last `window_s` seconds (or the last `min_replies` of the last
    `max_age_s`, if more) and whether each missed `budget_ms`."""

    def __init__(
        self,
        budget_ms: float,
        window_s: float = WINDOW_S,
        min_replies: int = MIN_REPLIES,
        max_age_s: float = MAX_AGE_S,
    ) -> None:
        self.budget_ms = budget_ms
        self.window_s = window_s
        self.min_replies = min_replies
        self.max_age_s = max_age_s
        self._replies: deque[tuple[float, bool, float]] = deque()  # (noted, late, when the speech ended)
        self._late = 0

    def add(self, latency_ms: float | None, now: float | None = None, age_ms: float | None = None) -> None:
        """One reply's latency from the end of speech; None: the utterance got no answer (shed),
        `age_ms` after its speech ended (unknown: now)."""
        late = latency_ms is None or latency_ms > self.budget_ms
        now = time.monotonic() if now is None else now
        age = latency_ms if latency_ms is not None else age_ms or 0.0
        self._replies.append((now, late, now - age / 1000))
        self._late += late
        self._trim(now)

    def share(self, now: float | None = None, since: float | None = None) -> tuple[float, int] | None:
        """The late share and the count of the window's replies (with `since`, only those to
        utterances whose speech ended after it); None while fewer than `min_replies` came (too few
        to tell a trend from one long utterance)."""
        self._trim(now)
        if since is None:
            n, late = len(self._replies), self._late
        else:
            after = [r[1] for r in self._replies if r[2] >= since]
            n, late = len(after), sum(after)
        return None if n < self.min_replies else (late / n, n)

    def _trim(self, now: float | None) -> None:
        now = time.monotonic() if now is None else now
        while self._replies and (
            self._replies[0][0] < now - self.max_age_s
            or (self._replies[0][0] < now - self.window_s and len(self._replies) > self.min_replies)
        ):
            self._late -= self._replies.popleft()[1]


def reading_behind(delays: list[float], slack_ms: float) -> str | None:
    """Why the front end counts as behind on reading, else None: more than `LATE_SHARE` of the
    streaming devices' live audio (`delays`, seconds from spoken to seen by the VAD) reached the VAD
    more than `slack_ms` late. The replies' lateness shows a saturated front end only after
    utterances end and a window of them fills (seconds); the input delay shows it on the next frame."""
    if not slack_ms or len(delays) < MIN_STREAMS:
        return None
    late = sum(1 for d in delays if d * 1000 > slack_ms)
    if late < MIN_LATE_STREAMS or late <= LATE_SHARE * len(delays):
        return None
    return (
        f"the audio of {late} of {len(delays)} streaming devices reached the VAD more than "
        f"{slack_ms:g} ms after it was spoken (asr.budget_ms less vad.min_silence_ms)"
    )


class Governor:
    """Admission and shedding for one process, from its recogniser and its front end."""

    def __init__(self, budget_ms: float, min_silence_ms: float, recogniser: Recogniser) -> None:
        self.budget_ms = budget_ms
        self.slack_ms = max(0.0, budget_ms - min_silence_ms) if budget_ms else 0.0
        self.recogniser = recogniser
        self.replies = LateReplies(budget_ms)
        self.reading: str | None = None  # why the front end is behind, as of the last `note_reading`
        self._not_draining: str | None = None  # ... and not catching up
        self._delays: Mapping[object, float] = {}
        self._behind_since: float | None = None
        self._last_round: ShedRound | None = None
        self._unheard = 0  # devices let in and not yet heard, as of the last `note_unheard`
        self._admitted = 0  # ... and connections admitted since

    # --- the two signals ---------------------------------------------------------------------

    def note_reply(self, latency_ms: float | None, age_ms: float | None = None) -> None:
        """A device utterance was answered `latency_ms` after its end of speech (None: shed
        unanswered, `age_ms` after it ended)."""
        if self.budget_ms:
            self.replies.add(latency_ms, age_ms=age_ms)

    def note_reading(self, delays: Mapping[object, float]) -> None:
        """The input delay (seconds) of each streaming session, keyed by session, read once a sweep:
        whether the front end is behind, and whether it is while not catching up."""
        previous, self._delays = self._delays, delays
        growing = [d if d > previous.get(k, 0.0) - DRAINING_S else 0.0 for k, d in delays.items()]
        self.reading = reading_behind(list(delays.values()), self.slack_ms)
        self._not_draining = reading_behind(growing, self.slack_ms)

    def note_unheard(self, sessions: int) -> None:
        """The device sessions let in within `UNHEARD_S` and not answered yet, counted once a sweep."""
        self._unheard, self._admitted = sessions, 0

    def recogniser_behind(self, since: ShedRound | None = None) -> str | None:
        """Why the recogniser's answers miss the budget now, else None: its next job has waited past
        the slack, or more than `LATE_SHARE` of the window's replies came late. `since` (the last
        round of shedding): only what came after it counts, the replies to utterances that ended
        since and a wait longer than then, so each round sees the effect of the last."""
        if not self.budget_ms:
            return None
        wait = self.recogniser.head_wait()
        if wait * 1000 >= self.slack_ms and (since is None or wait > since.wait_s):
            return f"the recogniser is {wait * 1000:.0f} ms behind (the budget leaves {self.slack_ms:g} ms)"
        late = self.replies.share(since=None if since is None else since.at)
        if late is not None and late[0] > LATE_SHARE:
            return f"{late[0]:.0%} of the last {late[1]} replies came later than asr.budget_ms = {self.budget_ms:g}"
        return None

    # --- the two decisions -------------------------------------------------------------------

    def admit(self) -> str | None:
        """Why a new connection (any port) must be refused now, else None: its answers would miss
        the budget (the recogniser or the front end is behind), or the recogniser's load is past
        `MAX_LOAD`, where the devices already in will make the next replies late. The load counts
        the devices let in and not heard yet at one recognition each (`call_load`, measured): a
        wave of them has not shown in the load, and will all at once."""
        if not self.budget_ms:
            return None
        why = self.recogniser_behind() or self.reading
        if why is None:
            load = self.recogniser.load()
            coming = self._unheard + self._admitted
            with_coming = load + coming * (self.recogniser.call_load() or 0.0)
            if load >= MAX_LOAD:
                why = f"the recogniser's load is {load:.2f} (more devices would make its replies late)"
            elif with_coming >= MAX_LOAD:
                why = (
                    f"the recogniser's load is {load:.2f}, and {coming} devices let in have not spoken yet "
                    f"({with_coming:.2f} with theirs; more would make its replies late)"
                )
        if why is None:
            self._admitted += 1
        return why

    def shed(self, sessions: int, now: float | None = None) -> Shed | None:
        """Called once a sweep with the `sessions` open: a round of shedding when the server has
        stayed behind for `SHED_AFTER_S` although it refuses new devices (more devices talk than
        the recogniser answers in budget, or the front end's backlog does not drain), and, after a
        round, only on what came since."""
        now = time.monotonic() if now is None else now
        behind = self.recogniser_behind() or self._not_draining
        if behind is None:
            self._behind_since = self._last_round = None
            return None
        why = behind if self._last_round is None else self.recogniser_behind(self._last_round) or self._not_draining
        if why is None:
            return None  # behind, but nothing since the last round says it was not enough: let it show
        if self._behind_since is None:
            self._behind_since = now
            return None
        if now - self._behind_since < SHED_AFTER_S or not sessions:
            return None
        self._behind_since = now  # one round per period: the queue gets time to show the effect
        self._last_round = ShedRound(now, self.recogniser.head_wait())  # and the replies, new ones
        return Shed(max(1, math.ceil(SHED_FRACTION * sessions)), why)
