"""The browser console in a real browser: Debian's Chromium, headless, driven by Playwright, its
microphone playing a speech clip (Chromium's fake capture device loops a WAV file).

Checked through the DOM: a missing and a wrong key say so; talking through the device endpoint
gives the clip's transcript; the live view shows the page's own session, then its end; a voice
enrolled from the microphone is the speaker of the next utterance; a dropped file is transcribed
with its segments. A screenshot of each view goes to build/test-artifacts/console/ (git-ignored).
Skipped, with the reason, where Chromium or Playwright is absent (`scripts/setup.sh test` installs
Chromium with apt). The talking tests need the shared clips (the tiny models transcribe those);
without them only the CORS test runs, its upload a synthetic voice.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.support.audio import HAVE_AUDIO, REPO, cer, clip, needs_audio, voice

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "build" / "test-artifacts" / "console"
KEY = "sk-console-test"
CLIP = "en_tts_living_room_light"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (scripts/setup.sh test installs it)"),
]
playwright_api = pytest.importorskip(
    "playwright.async_api", reason="playwright is not installed (requirements/test.txt)"
)
expect = playwright_api.expect


def chromium_args(mic_wav: Path) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={mic_wav}",
    ]


def microphone_wav(tmp: Path) -> tuple[Path, str | None]:
    """The clip (or a synthetic voice) between 2 s of silence, as 16-bit 16 kHz WAV, and its transcript."""
    if HAVE_AUDIO:
        import soxr

        c = clip(CLIP)
        audio, rate = sf.read(c.path, dtype="float32", always_2d=True)
        speech, transcript = audio.mean(axis=1), c.transcript
        if rate != 16000:
            speech = soxr.resample(speech, rate, 16000)
    else:
        speech, transcript = 0.3 * voice(2.0, 140.0, seed=1), None
    pad = np.zeros(2 * 16000, np.float32)
    path = tmp / "microphone.wav"
    sf.write(path, np.concatenate([pad, speech, pad]), 16000, subtype="PCM_16")
    sf.write(tmp / "voice.wav", speech, 16000, subtype="PCM_16")  # what the voices view uploads
    return path, transcript


@pytest.fixture
async def console(start_server, tmp_path):
    mic, transcript = microphone_wav(tmp_path)
    server = await start_server(http={"api_keys": [KEY]})
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=chromium_args(mic))
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.goto(server.endpoints.http_url + "/")
        yield page, server, mic, transcript
        await browser.close()
    assert not errors, errors
    pipeline = server.pipeline
    assert pipeline is not None and pipeline.voiceprints is not None
    pipeline.voiceprints.remove("console-tester")


async def use_key(page, key: str) -> None:
    await page.fill("#key", key)
    await page.click("#key-form button")


async def talk_until(page, selector: str, timeout_ms: float = 30_000):
    """Start talking, wait for `selector` in the stt list, stop; the matching row's text."""
    await page.click("#talk-connect")
    row = page.locator(selector).first
    await row.wait_for(timeout=timeout_ms)
    text = await row.locator("td.text").text_content()
    await page.click("#talk-connect")
    return text


@needs_audio
async def test_talk_live_voices_and_health_in_chromium(console):
    page, server, mic, transcript = console
    banner = page.locator("#auth-message")
    await banner.wait_for()
    assert "needs an API key" in await banner.text_content()
    await use_key(page, "wrong-key")
    await expect(banner).to_contain_text("refused")
    assert "invalid API key" in await banner.text_content()
    await page.screenshot(path=ARTIFACTS / "wrong-key.png")
    await use_key(page, KEY)
    await expect(banner).to_be_hidden()
    await expect(page.locator("#talk-url")).to_have_value(re.compile("^ws://"))
    device_id = await page.input_value("#talk-device")

    # Talk (hands-free): the clip's transcript comes back as the page's own device's stt.
    await page.click("#talk-connect")
    first = page.locator("#stt-list tr").first
    await first.wait_for(timeout=30_000)
    text = await first.locator("td.text").text_content()
    assert cer(transcript, text) <= 0.2, text
    assert await page.text_content("#vad-value") != "–"  # the server's VAD meter moved
    await page.screenshot(path=ARTIFACTS / "talk.png")

    # Live: the page's own session is listed while it talks...
    await page.click("#tabs button[data-tab=live]")
    own = page.locator(f'#session-list tr[data-device="{device_id}"]')
    await own.wait_for(timeout=10_000)
    await expect(own.locator("td").nth(5)).not_to_have_text("0", timeout=10_000)  # its utterances
    assert "xiaozhi v1" in await own.text_content()
    await page.locator("#transcript-list tr").first.wait_for(timeout=10_000)
    await page.screenshot(path=ARTIFACTS / "live.png")
    # ...and shown ended once it stops.
    await page.click("#tabs button[data-tab=talk]")
    await page.click("#talk-connect")
    await page.click("#tabs button[data-tab=live]")
    await page.locator(f'#session-list tr.closed[data-device="{device_id}"]').wait_for(timeout=10_000)
    assert await page.locator(f'#session-list tr.closed[data-device="{device_id}"] td.state').text_content() == "closed"

    # Voices: enrol the clip's voice (an uploaded file), identify a recording of the microphone,
    # then talk again: the stt names the speaker.
    await page.click("#tabs button[data-tab=voices]")
    await page.fill("#enrol-name", "console-tester")
    await page.locator("#enrol-files").set_input_files(str(mic.with_name("voice.wav")))
    await page.locator('#voice-list tr[data-speaker="console-tester"]').wait_for(timeout=30_000)
    await page.click("#identify-record")
    await expect(page.locator("#identify-result")).to_contain_text("console-tester (score", timeout=20_000)
    await page.screenshot(path=ARTIFACTS / "voices.png")
    await page.click("#tabs button[data-tab=talk]")
    await talk_until(page, "#stt-list tr:has(td.speaker:text-matches('console-tester'))")

    # Health: the models, and the latency of the utterances just recognised.
    await page.click("#tabs button[data-tab=health]")
    await expect(page.locator("#h-latency")).to_contain_text("ms", timeout=10_000)
    assert "sensevoice" in await page.text_content("#h-models")
    assert await page.locator("#latency-chart polyline").count() == 3
    await page.screenshot(path=ARTIFACTS / "health.png", full_page=True)


@needs_audio
async def test_a_dropped_file_is_transcribed_with_its_segments(console):
    page, _, mic, transcript = console
    await use_key(page, KEY)
    await expect(page.locator("#auth-message")).to_be_hidden()
    upload = page.locator("#drop-file")
    await upload.set_input_files(str(mic))
    await page.locator("#file-result").wait_for(timeout=30_000)
    assert await page.locator("#file-segments tr").count() >= 1
    assert cer(transcript, await page.text_content("#file-text")) <= 0.2
    assert await page.locator("#file-words span.word").count() >= 3
    await page.screenshot(path=ARTIFACTS / "file.png", full_page=True)


@needs_audio
async def test_push_to_talk_sends_what_was_said_while_held(console):
    page, _, _, transcript = console
    await use_key(page, KEY)
    await expect(page.locator("#talk-url")).to_have_value(re.compile("^ws://"))
    await page.select_option("#talk-mode", "manual")
    await page.click("#talk-connect")
    ptt = page.locator("#talk-ptt")
    await expect(ptt).to_be_enabled(timeout=10_000)
    await ptt.hover()
    await page.mouse.down()  # held for one turn of the microphone's loop (silence, the clip, silence)
    await expect(ptt).to_have_class(re.compile("held"))
    await page.wait_for_timeout(6_500)
    await expect(page.locator("#stt-list tr")).to_have_count(0)  # manual mode answers at the release
    await page.mouse.up()
    row = page.locator("#stt-list tr").first
    await row.wait_for(timeout=30_000)
    assert "living room" in (await row.locator("td.text").text_content()).lower()
    await page.click("#talk-connect")


async def test_cors_lets_a_configured_origin_call_the_api_and_blocks_another(start_server, tmp_path):
    """Issue 13's CORS in a real browser: a page on another origin (a second tiny server on
    loopback) may POST /v1/audio/transcriptions when its origin is in `http.cors_origins`."""
    from aiohttp import web

    mic, transcript = microphone_wav(tmp_path)

    async def index(request: web.Request) -> web.StreamResponse:
        return web.Response(text="<!doctype html><title>other origin</title>", content_type="text/html")

    async def clip_wav(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(mic)

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/clip.wav", clip_wav)
    runners = []
    origins = []
    for _ in range(2):
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        origins.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
    allowed, other = origins
    server = await start_server(http={"api_keys": [KEY], "cors_origins": [allowed]})
    call = """async ([api, key]) => {
        const form = new FormData();
        form.append("file", await (await fetch("/clip.wav")).blob(), "clip.wav");
        form.append("model", "sensevoice-small");
        try {
            const r = await fetch(api + "/v1/audio/transcriptions",
                                  {method: "POST", body: form, headers: {Authorization: "Bearer " + key}});
            return {status: r.status, body: await r.json()};
        } catch (e) { return {error: String(e)}; }
    }"""
    try:
        async with playwright_api.async_playwright() as p:
            browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=chromium_args(mic))
            page = await browser.new_page()
            await page.goto(allowed + "/")
            got = await page.evaluate(call, [server.endpoints.http_url, KEY])
            assert got.get("status") == 200, got
            if transcript is not None:
                assert cer(transcript, got["body"]["text"]) <= 0.2, got
            await page.goto(other + "/")
            got = await page.evaluate(call, [server.endpoints.http_url, KEY])
            assert "error" in got and "Failed to fetch" in got["error"], got  # the browser refused the answer
            await browser.close()
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_history_searches_plays_corrects_deletes_erases_and_exports(start_server, tmp_path):
    """The History tab over an archive holding a device's Ogg Opus utterance and two uploads' FLAC."""
    from asr_server.core.archive import Query
    from tests.support.archive import device_record, record

    server = await start_server(http={"api_keys": [KEY]}, archive={"enabled": True, "dir": str(tmp_path / "archive")})
    archive = server.archive
    archive.keep(device_record("turn on the lihgt", "aa:bb:cc:dd:ee:01", "alice", 1.5))
    archive.keep(record("what is the weather", "aa:bb:cc:dd:ee:01", "bob"))
    archive.keep(record("good night", "aa:bb:cc:dd:ee:02"))
    archive.flush()
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=chromium_args(Path("/dev/null")))
        page = await browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: d.accept())
        await page.goto(server.endpoints.http_url + "/")
        await use_key(page, KEY)
        await page.click("#tabs button[data-tab=history]")
        rows = page.locator("#history-list tr")
        await expect(rows).to_have_count(3)

        # search and filter
        await page.fill("#history-q", "light")
        await page.click("#history-form button[type=submit]")
        await expect(rows).to_have_count(1)
        await page.fill("#history-q", "")
        await page.fill("#history-speaker", "bob")
        await page.click("#history-form button[type=submit]")
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_contain_text("bob")
        await page.fill("#history-speaker", "")
        await page.fill("#history-device", "aa:bb:cc:dd:ee:01")
        await page.click("#history-form button[type=submit]")
        await expect(rows).to_have_count(2)

        # play the device's Ogg Opus: Chromium decodes it to its length
        device_row = page.locator("#history-list tr", has_text="alice")
        await device_row.locator("button", has_text="play").click()
        audio = device_row.locator("audio")
        await audio.wait_for()
        await page.wait_for_function("document.querySelector('#history-list audio').duration > 0")
        duration = await audio.evaluate("a => a.duration")
        assert abs(duration - 1.5) < 0.08, duration
        await page.screenshot(path=ARTIFACTS / "history.png")

        # correct the text
        await device_row.locator("input.correction").fill("turn on the light")
        await device_row.locator("button", has_text="save").click()
        await expect(device_row.locator("button", has_text="saved")).to_be_visible()
        fixed = next(r for r in archive.search(Query(speaker="alice"))[0])
        assert fixed.corrected_text == "turn on the light" and fixed.text == "turn on the lihgt"

        # export what the filters show
        async with page.expect_download() as download:
            await page.click("#history-export")
        tar = await (await download.value).path()
        import tarfile

        with tarfile.open(tar) as t:
            manifest = t.extractfile("metadata.jsonl").read().decode()
        assert "turn on the light" in manifest and "good night" not in manifest

        # delete one, then erase the device
        await page.locator("#history-list tr", has_text="bob").locator("button.delete").click()
        await expect(rows).to_have_count(1)
        await page.click("#history-erase")
        await expect(page.locator("#history-state")).to_contain_text("erased 1")
        assert [r.device_id for r in archive.search(Query())[0]] == ["aa:bb:cc:dd:ee:02"]
        await browser.close()
    assert not errors, errors


async def test_hotwords_panel_sets_shows_refuses_and_deletes_a_devices_list(console):
    page, server, _, _ = console
    await use_key(page, KEY)
    await expect(page.locator("#auth-message")).to_be_hidden()
    await page.click("#tabs button[data-tab=hotwords]")
    await expect(page.locator("#hotword-devices")).to_contain_text("no device has hotwords")
    await page.fill("#hotwords-device", "console-hotwords")
    await page.fill("#hotwords-text", "张三 2\n小米台灯\nliving room")
    await page.click("#hotwords-save")
    row = page.locator('#hotword-devices tr[data-device="console-hotwords"]')
    await expect(row.locator("td.count")).to_have_text("3")
    store = server.pipeline.hotwords.store
    assert [(h.text, h.weight) for h in store.get("console-hotwords")] == [
        ("张三", 2.0),
        ("小米台灯", None),
        ("living room", None),
    ]
    await page.screenshot(path=ARTIFACTS / "hotwords.png")
    await page.fill("#hotwords-text", "")
    await row.locator("button").click()  # edit: the stored list comes back into the editor
    await expect(page.locator("#hotwords-text")).to_have_value("张三 2\n小米台灯\nliving room")
    await page.fill("#hotwords-text", "张三 99")  # a weight out of range: refused, the stored list kept
    await page.click("#hotwords-save")
    await expect(page.locator("#hotwords-error")).to_contain_text("weight")
    assert len(store.get("console-hotwords")) == 3
    await page.click("#hotwords-delete")
    await expect(page.locator("#hotword-devices")).to_contain_text("no device has hotwords")
    assert store.get("console-hotwords") == ()
