#!/usr/bin/env bash
# Relay mode against the REAL xiaozhi-esp32-server, on one machine, with no internet:
#
#   simulated device --(Opus)--> asr-server (VAD, SenseVoice, speaker) --(listen/detect text)-->
#   xiaozhi-esp32-server (its LLM and TTS are loopback stubs) --(stt, llm, tts, Opus)--> back to the device
#
#   scripts/relay-xiaozhi-server.sh [XIAOZHI_SOURCE]
#
# XIAOZHI_SOURCE: a checkout of xinnan-tech/xiaozhi-esp32-server (or its main/xiaozhi-server folder, or a
# bare git repository of it); default: a sparse clone from GitHub. The script copies main/xiaozhi-server
# into $WORK, makes its own venv there, writes stub LLM/TTS servers and the data/.config.yaml, starts the
# stubs, xiaozhi-server and asr-server on free loopback ports, runs one simulated device per protocol
# version in $PROTOCOLS, prints what the device received, and stops everything it started.
# Exit status 0 when every device got the upstream's stt, TTS audio and `tts stop`.
#
# Knobs (environment): WORK (default /tmp/relay-xiaozhi), PYTHON (python3.11, else python3) for
# xiaozhi-server's venv, XZ_VENV (default $WORK/xz-venv; reused when it already imports the server's
# modules), CLIP (a 16 kHz speech file; default the workplace's Mandarin AISHELL clip), PROTOCOLS (device
# protocol versions, default "1 2 3"), LISTEN_S (how long a device waits for the answer, default 20),
# XIAOZHI_REF (branch or tag to clone, default the default branch), HOLD (set: keep everything running
# after the devices, until Ctrl-C, and print the ports). Any ASR_SERVER__* variable reaches
# asr-server (e.g. ASR_SERVER__ASR__MODEL_DIR for other models); its ports and upstream.url are set here.
#
# Not a test: nothing here is collected by pytest. Needs apt (ffmpeg, libopus0) and PyPI, nothing else.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
src_arg="${1:-}"
work="${WORK:-/tmp/relay-xiaozhi}"
xz_venv="${XZ_VENV:-$work/xz-venv}"
clip="${CLIP:-${ASR_AUDIO_DIR:-$repo/../shared/audio}/zh_aishell_BAC009S0724W0121_wenet.wav}"
protocols="${PROTOCOLS:-1 2 3}"
listen_s="${LISTEN_S:-20}"
mkdir -p "$work/logs"
log() { echo "relay-xiaozhi: $*" >&2; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- 0. Our side: asr-server's venv with the load-test device (opuslib, soundfile, soxr) -----------------
if ! "$repo/.venv/bin/python" -c 'import asr_server, opuslib, soundfile, soxr' 2>/dev/null; then
    log "asr-server's venv lacks the test lock; running scripts/setup.sh test"
    "$repo/scripts/setup.sh" test
fi
[ -f "$clip" ] || { log "no speech clip at $clip (set CLIP=...)"; exit 2; }
if [ -z "${ASR_SERVER__ASR__MODEL_DIR:-}" ]; then
    # The configured models, as scripts/serve.sh does: fetches only what is missing, offline when all is there.
    (cd "$repo" && .venv/bin/python -m asr_server models pull)
fi

# --- 1. xiaozhi-esp32-server's source: only main/xiaozhi-server, copied so that our data/.config.yaml ------
#        never lands in (or clobbers the config of) the caller's checkout.
xz="$work/xiaozhi-server"
rm -rf "$xz"
if [ -z "$src_arg" ]; then
    # A sparse, blob-less clone: the repository also holds the Java/Vue manager and a digital human,
    # hundreds of MB that the Python server does not need.
    log "cloning xiaozhi-esp32-server (main/xiaozhi-server only)"
    rm -rf "$work/src"
    git clone -q --depth 1 --filter=blob:none --sparse ${XIAOZHI_REF:+--branch "$XIAOZHI_REF"} \
        https://github.com/xinnan-tech/xiaozhi-esp32-server "$work/src"
    git -C "$work/src" sparse-checkout set main/xiaozhi-server
    src_arg="$work/src"
fi
if [ -f "$src_arg/app.py" ] && [ -d "$src_arg/core" ]; then
    cp -a "$src_arg" "$xz"
elif [ -f "$src_arg/main/xiaozhi-server/app.py" ]; then
    cp -a "$src_arg/main/xiaozhi-server" "$xz"
elif [ "$(git -C "$src_arg" rev-parse --is-bare-repository 2>/dev/null)" = "true" ]; then
    # A bare mirror: write the tree file by file. Mirrors made with partial clones lack some large blobs
    # (the sample music mp3s); those are skipped, as this run plays no music.
    log "exporting main/xiaozhi-server from the bare repository $src_arg"
    git -C "$src_arg" ls-tree -r -z HEAD main/xiaozhi-server | while IFS= read -r -d '' entry; do
        obj=$(cut -d' ' -f3 <<<"${entry%%$'\t'*}"); path="${entry#*$'\t'}"; out="$xz/${path#main/xiaozhi-server/}"
        mkdir -p "$(dirname "$out")"
        git -C "$src_arg" cat-file blob "$obj" >"$out" 2>/dev/null || { rm -f "$out"; log "  (blob absent, skipped: $path)"; }
    done
else
    log "$src_arg is neither a xiaozhi-esp32-server checkout, its main/xiaozhi-server, nor a bare repository"
    exit 2
fi
if git -C "$src_arg" rev-parse HEAD >/dev/null 2>&1; then
    log "xiaozhi-esp32-server at $(git -C "$src_arg" log -1 --format='%h %cd' --date=short HEAD)"
fi

# --- 2. Its venv. requirements.txt pins torch 2.2.2 (no wheel for Python 3.11+) and local-model providers;
#        the providers chosen below (silero VAD on ONNX Runtime, FunASRServer, openai LLM, custom TTS,
#        nomem, nointent) need none of torch, torchaudio, silero_vad, funasr, modelscope, sherpa_onnx,
#        vosk, mem0ai, powermem. Silero's VAD runs on onnxruntime, which only silero_vad pulled in. ------
command -v ffmpeg >/dev/null || { log "installing ffmpeg (apt): xiaozhi-server refuses to start without it"; apt_install ffmpeg; }
ldconfig -p 2>/dev/null | grep -q 'libopus\.so\.0' || apt_install libopus0
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
probe='import aiohttp, websockets, openai, onnxruntime, opuslib_next, pydub, loguru, ruamel.yaml, mcp, markitdown, bs4, cnlunar, jwt, aioconsole, psutil, portalocker'
if ! "$xz_venv/bin/python" -c "$probe" 2>/dev/null; then
    log "making xiaozhi-server's venv $xz_venv with $("$python" --version)"
    "$python" -m venv "$xz_venv"
    grep -vE '^\s*(#|$)' "$xz/requirements.txt" \
        | grep -viE '^(torch|torchaudio|silero[_-]vad|funasr|modelscope|sherpa[_-]onnx|vosk|mem0ai|powermem)\b' \
        >"$work/xz-requirements.txt"
    echo onnxruntime >>"$work/xz-requirements.txt"
    "$xz_venv/bin/python" -m pip install -q --disable-pip-version-check -r "$work/xz-requirements.txt" \
        >"$work/logs/xz-pip.log" 2>&1 || { log "pip failed; see $work/logs/xz-pip.log"; exit 2; }
fi

# --- 3. Free loopback ports: stub, xiaozhi ws + http, ours device + http + funasr ---------------------------
read -r stub_port xz_port xz_http_port dev_port http_port funasr_port < <("$xz_venv/bin/python" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)

# --- 4. The stubs: an OpenAI-compatible LLM (stream=true as SSE) and the TTS endpoint xiaozhi's `custom`
#        provider POSTs the sentence to (it answers a short WAV; xiaozhi turns it into 60 ms Opus frames
#        with ffmpeg/pydub). Both log what they were asked, which shows what reached the upstream. --------
cat >"$work/stub.py" <<'EOF'
import asyncio, io, json, math, os, sys, time, wave
from aiohttp import web

ANSWER = os.environ.get("STUB_ANSWER", "你好，我是小智。很高兴认识你！")

def say(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)

def tone_wav(seconds: float, rate: int = 24000) -> bytes:
    """A quiet 440 Hz tone: any audio will do, the device only counts and decodes the frames."""
    n = int(seconds * rate)
    pcm = b"".join(int(3000 * math.sin(2 * math.pi * 440 * i / rate)).to_bytes(2, "little", signed=True) for i in range(n))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1); w.setsampwidth(2); w.setframerate(rate); w.writeframes(pcm)
    return buf.getvalue()

WAV = tone_wav(1.0)

async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    user = [m.get("content") for m in body.get("messages", []) if m.get("role") == "user"]
    say(f"LLM  <- user {user[-1] if user else None!r} (stream={body.get('stream')}, tools={len(body.get('tools') or [])})")
    base = {"id": "chatcmpl-stub", "created": int(time.time()), "model": body.get("model", "stub")}
    if not body.get("stream"):
        return web.json_response({**base, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}]})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    pieces = [ANSWER[i:i + 3] for i in range(0, len(ANSWER), 3)]
    for i, piece in enumerate(pieces):
        delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
        chunk = {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        await resp.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
        await asyncio.sleep(0.02)  # tokens arrive over time, as from a real model
    done = {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    await resp.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())
    await resp.write_eof()
    say(f"LLM  -> {ANSWER!r} in {len(pieces)} chunks")
    return resp

async def tts(request: web.Request) -> web.Response:
    params = await request.json() if request.can_read_body else dict(request.query)
    say(f"TTS  <- {params.get('text')!r} -> {len(WAV)} bytes of WAV")
    return web.Response(body=WAV, content_type="audio/wav")

app = web.Application()
app.router.add_post("/v1/chat/completions", chat)
app.router.add_post("/tts", tts)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
EOF

# --- 5. xiaozhi-server's data/.config.yaml (it overrides config.yaml key by key). Everything local. -----------
mkdir -p "$xz/data"
# The stock prompt template asks an IP-geolocation and a weather API per connection; this one does not.
echo '{{base_prompt}}' >"$xz/data/offline-prompt.txt"
cat >"$xz/data/.config.yaml" <<EOF
server:
  ip: 127.0.0.1
  port: $xz_port
  http_port: $xz_http_port
  auth_key: relay-xiaozhi-demo   # else a random one; only signs OTA/vision tokens, unused here
prompt: 你是小智，一个说话简短的语音助手。
prompt_template: data/offline-prompt.txt
selected_module:
  VAD: SileroVAD        # ONNX model shipped in the repo (models/snakers4_silero-vad), no torch
  ASR: FunASRServer     # asr-server's FunASR-compatible socket; in relay mode it never gets audio
  LLM: StubLLM
  TTS: StubTTS
  Memory: nomem
  Intent: nointent      # function_call would hand the stub tool schemas; plain chat is the point here
ASR:
  FunASRServer:
    type: fun_server
    host: 127.0.0.1
    port: $funasr_port
    is_ssl: false
    api_key: none
    output_dir: tmp/
LLM:
  StubLLM:
    type: openai
    base_url: http://127.0.0.1:$stub_port/v1
    model_name: stub
    api_key: sk-local-stub
TTS:
  StubTTS:
    type: custom
    method: POST
    url: http://127.0.0.1:$stub_port/tts
    params:
      text: "{prompt_text}"
    headers: {}
    format: wav
    output_dir: tmp/
EOF

# --- 6. Start the stub, xiaozhi-server and asr-server; stop them whatever happens ------------------------------
pids=()
cleanup() {  # each process we started, by its pid: TERM, up to 5 s, then KILL
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    pids=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM  # exit, so that the EXIT trap cleans up (a bare handler would carry on)
wait_port() {  # port, name, pid, log: until something listens, or the process dies, or 90 s pass
    for _ in $(seq 180); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || { log "$2 exited; last lines of $4:"; tail -n 30 "$4" >&2; exit 1; }
        sleep 0.5
    done
    log "$2 did not listen on $1 within 90 s; last lines of $4:"; tail -n 30 "$4" >&2; exit 1
}

"$xz_venv/bin/python" "$work/stub.py" "$stub_port" >"$work/logs/stub.log" 2>&1 &
pids+=($!); wait_port "$stub_port" "stub" "$!" "$work/logs/stub.log"

# app.py reads stdin (aioconsole) for Enter presses: give it /dev/null... which ends that task at once,
# harmlessly. It must run from its own folder (relative config, model and tmp paths).
(cd "$xz" && exec "$xz_venv/bin/python" app.py </dev/null >"$work/logs/xiaozhi-server.log" 2>&1) &
pids+=($!); wait_port "$xz_port" "xiaozhi-server" "$!" "$work/logs/xiaozhi-server.log"
log "xiaozhi-server on ws://127.0.0.1:$xz_port/xiaozhi/v1/"

# The FunASR socket's self-signed certificate (for wss://; xiaozhi connects with ws:// here) and the voiceprint
# database go to $WORK, not into the checkout's data/ (unless you point ASR_SERVER__SPEAKER__DB at yours).
(cd "$repo" && ASR_SERVER__SPEAKER__DB="${ASR_SERVER__SPEAKER__DB:-$work/voiceprints.sqlite}" \
    ASR_SERVER__XIAOZHI__HOST=127.0.0.1 ASR_SERVER__XIAOZHI__PORT="$dev_port" \
    ASR_SERVER__HTTP__HOST=127.0.0.1 ASR_SERVER__HTTP__PORT="$http_port" \
    ASR_SERVER__FUNASR__HOST=127.0.0.1 ASR_SERVER__FUNASR__PORT="$funasr_port" \
    ASR_SERVER__FUNASR__SELF_SIGNED_CERT="$work/funasr-selfsigned.pem" \
    ASR_SERVER__UPSTREAM__URL="ws://127.0.0.1:$xz_port/xiaozhi/v1/" \
    exec .venv/bin/python -m asr_server serve >"$work/logs/asr-server.log" 2>&1) &
pids+=($!); ours=$!
for _ in $(seq 240); do  # /readyz: the models are loaded and every listener is up
    "$repo/.venv/bin/python" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$http_port/readyz', timeout=2)" \
        2>/dev/null && break
    kill -0 "$ours" 2>/dev/null || { log "asr-server exited:"; tail -n 30 "$work/logs/asr-server.log" >&2; exit 1; }
    sleep 0.5
done
log "asr-server: devices on ws://127.0.0.1:$dev_port/xiaozhi/v1/, relaying to xiaozhi-server"

# --- 7. The simulated device (the load test's Device): hello, listen start auto, the clip in real time,
#        900 ms of silence, then whatever comes back for up to LISTEN_S seconds. --------------------------------
status=0
for version in $protocols; do
    echo
    echo "=== device, protocol version $version ==="
    (cd "$repo" && .venv/bin/python - "$dev_port" "$version" "$clip" "$listen_s" <<'EOF') || status=1
import asyncio, json, sys, time
import opuslib
from asr_server.adapters.xiaozhi.wire import AudioFrame, unpack_audio
from loadtest.clips import load_clip
from loadtest.device import Device, DeviceConfig, ReplyTimeout, DeviceClosed

port, version, path, listen_s = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])

async def main() -> int:
    cfg = DeviceConfig(url=f"ws://127.0.0.1:{port}/xiaozhi/v1/", device_id="02:00:00:00:00:01", protocol_version=version)
    async with Device(cfg) as dev:
        t0 = time.monotonic()
        print("hello  ", json.dumps(dev.server_hello, ensure_ascii=False))
        await dev.listen("start", "auto")
        clip = load_clip(path)
        await dev.send_opus(clip.packets, 1.0)
        await dev.send_silence(900, 1.0)
        sent = time.monotonic()
        print(f"sent {len(clip.packets)} Opus packets ({clip.duration_ms / 1000:.1f} s) + 900 ms silence")
        got, stop_at = [], None
        while time.monotonic() - sent < listen_s:
            if stop_at is not None and time.monotonic() - stop_at > 2.0:
                break  # the answer is over: 2 s after `tts stop` nothing more is due
            try:
                m = await dev.next_message(timeout=0.5)
            except ReplyTimeout:
                continue
            except DeviceClosed as e:
                print("closed ", e)
                break
            got.append(m)
            if m.type == "tts" and m.data.get("state") == "stop":
                stop_at = time.monotonic()
        frames = list(dev.binary)
    # What arrived, in order: JSON messages, with the runs of binary TTS frames between them.
    events = [(m.at, "json", m) for m in got] + [(at, "bin", f) for at, f in frames]
    run = 0
    for at, kind, item in sorted(events, key=lambda e: e[0]):
        if kind == "bin":
            run += 1
            continue
        if run:
            print(f"           [{run} binary TTS frames]")
            run = 0
        data = {k: v for k, v in item.data.items() if k != "session_id"}
        print(f"{at - t0:7.2f} s {item.type:<5}", json.dumps(data, ensure_ascii=False)[:160])
    if run:
        print(f"           [{run} binary TTS frames]")
    # Every frame must be this device's framing and decodable Opus (upstream sends v1; we re-frame).
    dec, samples, bad = opuslib.Decoder(24000, 1), 0, 0
    for _, f in frames:
        try:
            fr = unpack_audio(f, version)
            assert isinstance(fr, AudioFrame)
            samples += len(dec.decode(fr.payload, 5760)) // 2
        except Exception:
            bad += 1
    stt = [m.data.get("text") for m in got if m.type == "stt"]
    states = [m.data.get("state") for m in got if m.type == "tts"]
    print(f"types  : {[m.type for m in got]}")
    print(f"tts    : {states}")
    print(f"stt    : {stt}")
    print(f"binary : {dev.binary_received} frames, {bad} undecodable, {samples / 24000:.2f} s of audio")
    ok = bool(stt) and "stop" in states and dev.binary_received > 0 and bad == 0
    print("result :", "OK" if ok else "INCOMPLETE")
    return 0 if ok else 1

sys.exit(asyncio.run(main()))
EOF
done

# --- 8. What the upstream saw: the stub's log (the turn text reached its LLM), xiaozhi's and ours' key lines ---
echo
echo "=== stub LLM/TTS log ==="
cat "$work/logs/stub.log"
echo
echo "=== xiaozhi-server log (turns and errors) ==="
grep -aE '收到|大模型|stt|发送|ERROR|Error|error' "$work/logs/xiaozhi-server.log" | tail -n 40 || true
echo
echo "=== asr-server log (warnings and errors) ==="
grep -aE 'WARNING|ERROR|Traceback|upstream' "$work/logs/asr-server.log" | tail -n 40 || true
echo
if [ -n "${HOLD:-}" ]; then  # keep the stack up to try your own device or firmware against it
    log "holding (HOLD is set): devices on ws://127.0.0.1:$dev_port/xiaozhi/v1/, xiaozhi-server on ws://127.0.0.1:$xz_port/xiaozhi/v1/, HTTP API on http://127.0.0.1:$http_port; Ctrl-C stops"
    while kill -0 "$ours" 2>/dev/null; do sleep 1; done
fi
log "logs in $work/logs; rerun: $0 ${1:-}"
exit "$status"
