"""How many recognitions, threads and batch items a config means on this machine.

`auto` settings resolve here, from the device (CPU or GPU), the cores this process may use and
the inference mode, so the pipeline and the engines it loads agree on them.
"""

from __future__ import annotations

import os

from ..config import Config


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def asr_parallel(config: Config) -> int:
    """Recognitions at once: `asr.parallel`, where `auto` is 1 on a GPU (it batches) and on a CPU one
    per two cores, one per core below four: int8 SenseVoice on one thread takes 105 ms per 5 s
    utterance against 93 ms on two (BENCHMARKS.md), so two at once nearly double what the cores
    recognise, and the 800 ms capacity rose from 30 to 40 talkers on 2 cores."""
    if config.inference.mode == "ray":
        return config.inference.max_in_flight  # requests in Ray at once; the replicas do the computing
    if config.asr.parallel != "auto":
        return int(config.asr.parallel)
    if config.engine.device.startswith("cuda"):
        return 1
    cores = _cores()
    return cores if cores < 4 else cores // 2


def asr_threads(config: Config) -> int:
    """The recogniser's intra-op threads: `engine.threads`, or with 0 the runtime's choice for one
    recognition at a time and the cores shared out when several run at once. A process held to
    some of the cores (a worker of `serve --workers`, or `taskset`) counts only those: the
    runtime's own choice would be every core of the machine, oversubscribing them N times."""
    n = asr_parallel(config)
    if config.engine.threads:
        return config.engine.threads
    if n == 1 and _cores() >= (os.cpu_count() or 1):
        return 0
    return max(1, _cores() // n)


def batch_size(config: Config, max_batch: int | str) -> int:
    """`max_batch`, where `auto` is 1 on a CPU (a batch costs the sum of its items there, and every
    caller waits for all of it) and 16 on a GPU (a batch costs little more than one item)."""
    if config.inference.mode == "ray":
        return 1  # one request per utterance: the replicas batch across every front end (@serve.batch)
    if max_batch != "auto":
        return int(max_batch)
    return 16 if config.engine.device.startswith("cuda") else 1
