"""The playground: its routes in-process (no model), then the page against a real `glimpse serve tiny-vl`
driven by headless Chromium: the API key, streaming with the reasoning folded, stop and regenerate, an
image, a PDF and a video with the sampled frames on a timeline and cited ranges that seek the player,
errors in the server's words, the conversation kept across a reload, the document extractor, the video
analyst, a phone-sized window, labels, and no console errors.

Each browser state is saved as a screenshot (in a temporary directory, or in $GLIMPSE_PLAYGROUND_SHOTS).
The tiny model's weights are random: answers that must say something are forced with the server's test
hook (`glimpse_forced_output`, sent through the page's "extra request fields").
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from glimpse.agents import Completion, ModelClient, ModelRequest
from glimpse.errors import NotFoundError
from glimpse.processing.media import MediaLimits
from glimpse.server.app import build_app
from glimpse.server.jobs import BusyError, Job, JobCancelled, JobStore, ProgressClient
from glimpse.server.metrics import ServerMetrics
from glimpse.server.serving_completions import ServingContext
from tests.agents.generated import make_image, make_pdf, make_video, pdf_bytes
from tests.agents.test_inprocess import DOC_SCHEMA
from tests.server.server_process import start_server, wait_idle
from tests.server.test_server_app import FakeLLM

KEY = "secret"


# ------------------------------------------------------------------------------------ in-process routes


def _app_client(api_key: str | None = None, **limits) -> httpx.AsyncClient:
    llm = FakeLLM()
    ctx = ServingContext(
        llm=llm,  # type: ignore[arg-type]
        served_model_name="fake",
        media_limits=MediaLimits(**limits),
        metrics=ServerMetrics("fake", llm.engine.stats, llm.is_idle),
    )
    app = build_app(ctx, api_key=api_key)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _run(coro):
    return asyncio.run(coro)


def test_page_and_static_files_are_served_open():
    async def go():
        async with _app_client(api_key=KEY) as client:
            page = await client.get("/")
            script = await client.get("/playground/js/main.js")
            style = await client.get("/playground/playground.css")
            missing = await client.get("/playground/nope.js")
        return page, script, style, missing

    page, script, style, missing = _run(go())
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'data-api-key="required"' in page.text  # the page asks for the key before its first call
    assert "http" not in page.text.replace("http-equiv", "")  # nothing fetched from elsewhere
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert style.status_code == 200 and missing.status_code == 404
    open_page = _run(_open_index())
    assert 'data-api-key="open"' in open_page


async def _open_index() -> str:
    async with _app_client() as client:
        return (await client.get("/")).text


def test_job_routes_need_the_key_and_check_their_input():
    async def go():
        async with _app_client(api_key=KEY, max_video_bytes=1000) as client:
            auth = {"Authorization": f"Bearer {KEY}"}
            no_key = await client.get("/v1/glimpse/jobs/job-x")
            unknown = await client.get("/v1/glimpse/jobs/job-x", headers=auth)
            options = await client.post("/v1/glimpse/video", params={"options": '{"fps": "fast"}'},
                                        content=b"x", headers=auth)  # fmt: skip
            typo = await client.post("/v1/glimpse/video", params={"options": '{"segment": 3}'}, content=b"x",
                                     headers=auth)  # fmt: skip
            big = await client.post("/v1/glimpse/video", content=b"x" * 2000, headers=auth)
            empty = await client.post("/v1/glimpse/video", content=b"", headers=auth)
            not_video = await client.post("/v1/glimpse/video", content=b"not a video", headers=auth)
            files = [{"name": "a.pdf", "data": base64.b64encode(pdf_bytes(1)).decode()}]
            schema = await client.post("/v1/glimpse/extract", json={"schema": {"type": "string"}, "files": files},
                                       headers=auth)  # fmt: skip
            no_files = await client.post(
                "/v1/glimpse/extract", json={"schema": DOC_SCHEMA, "files": []}, headers=auth
            )
            bad_data = await client.post("/v1/glimpse/extract", headers=auth,
                                         json={"schema": DOC_SCHEMA, "files": [{"name": "a.pdf", "data": "%%%"}]})  # fmt: skip
        return no_key, unknown, options, typo, big, empty, not_video, schema, no_files, bad_data

    no_key, unknown, options, typo, big, empty, not_video, schema, no_files, bad_data = _run(go())
    assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"
    assert unknown.status_code == 404 and "no job 'job-x'" in unknown.json()["error"]["message"]
    assert options.status_code == 400 and options.json()["error"]["param"] == "fps"
    assert typo.status_code == 400 and "segment" in typo.json()["error"]["message"]
    assert big.status_code == 413 and "at most 1000" in big.json()["error"]["message"]
    assert empty.status_code == 400 and "empty" in empty.json()["error"]["message"]
    assert not_video.status_code == 400 and "not a readable video" in not_video.json()["error"]["message"]
    assert schema.status_code == 400 and schema.json()["error"]["param"] == "schema"
    assert no_files.status_code == 400 and no_files.json()["error"]["param"] == "files"
    assert bad_data.status_code == 400 and "base64" in bad_data.json()["error"]["message"]


def test_pdf_pages_as_thumbnails():
    async def go():
        async with _app_client(max_pdf_pages=2) as client:
            ok = await client.post("/v1/glimpse/pages", params={"width": 100}, content=pdf_bytes(2))
            too_many = await client.post("/v1/glimpse/pages", content=pdf_bytes(3))
            not_pdf = await client.post("/v1/glimpse/pages", content=b"hello")
        return ok, too_many, not_pdf

    ok, too_many, not_pdf = _run(go())
    pages = ok.json()["pages"]
    assert [p["page"] for p in pages] == [1, 2]
    assert all(
        p["image"].startswith("data:image/jpeg;base64,") and p["height"] > p["width"] > 0 for p in pages
    )
    assert too_many.status_code == 413 and not_pdf.status_code == 400


def _until(condition, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_job_store_runs_bounds_cancels_and_forgets():
    store = JobStore(workers=1, max_waiting=1, max_jobs=2)
    gate = threading.Event()
    first = store.new("extract", "a")
    store.submit(first, lambda job: gate.wait(10))
    _until(lambda: first.status == "running")
    second = store.new("extract", "b")
    store.submit(second, lambda job: None)  # waits behind the first
    with pytest.raises(BusyError):
        store.new("extract", "c")  # the queue is full: 429 before anything is uploaded
    assert store.cancel(second.id).status == "cancelled" and not second.dir.exists()
    gate.set()
    _until(lambda: first.status == "done")
    assert first.public()["elapsed_s"] >= 0 and first.public()["progress"]["requests"] == 0

    def broken(job):
        raise ValueError("a bug")

    failing = store.new("video", "v.mp4")
    store.submit(failing, broken)
    _until(lambda: failing.ended)
    assert failing.status == "failed" and failing.error == "ValueError: a bug"
    assert failing.public()["links"]["report_html"].endswith("/report.html")
    for name in "xyz":  # only the newest finished jobs are kept, with their files
        job = store.new("extract", name)
        store.submit(job, lambda job: None)
        _until(lambda job=job: job.ended)
    assert len(store.jobs) <= 3 and not first.dir.exists()
    with pytest.raises(NotFoundError):
        store.get(first.id)


class _Answers(ModelClient):
    name = "fake"

    def complete(self, requests, on_done=None):
        outs = [Completion("{}") for _ in requests]
        for i, out in enumerate(outs):
            if on_done:
                on_done(i, out)
        return outs


def test_progress_counts_notes_then_answers_and_stops_a_cancelled_job(tmp_path):
    job = Job("job-1", "video", "v.mp4", tmp_path, stage="scanning", total=3)
    client = ProgressClient(_Answers(), job)
    clip = {"role": "user", "content": [{"type": "clip", "clip": None}]}
    client.complete([ModelRequest([clip]), ModelRequest([clip])])
    assert (job.stage, job.done, job.total, job.requests) == ("notes", 2, 3, 2)
    client.complete(
        [ModelRequest([{"role": "user", "content": "notes so far"}], tools=[{"type": "function"}])]
    )
    assert (job.stage, job.requests) == ("answering", 3)
    job.cancelled = True
    with pytest.raises(JobCancelled):
        client.complete([ModelRequest([clip])])


# ------------------------------------------------------------------------------------ the page, for real


@pytest.fixture(scope="module")
def server():
    s = start_server("tiny-vl", api_key=KEY)
    yield s
    s.stop()
    s.remove_log()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("playground")
    return {
        "video": make_video(root / "clip.mp4", seconds=8.0, fps=4, scene_seconds=4.0),
        "pdf": make_pdf(root / "invoice.pdf", pages=2),
        "image": make_image(root / "receipt.png"),
    }


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("GLIMPSE_PLAYGROUND_SHOTS") or tmp_path_factory.mktemp("screens"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Page:
    """The browser on the playground, with helpers for what a user does."""

    def __init__(self, driver, url: str, shots: Path) -> None:
        from selenium.webdriver.common.by import By

        self.driver, self.url, self.shots, self.By = driver, url, shots, By
        self.expected_network: list[str] = []  # "status NNN" a test provoked on purpose

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def find(self, css: str):
        return self.driver.find_element(self.By.CSS_SELECTOR, css)

    def all(self, css: str):
        return self.driver.find_elements(self.By.CSS_SELECTOR, css)

    def wait(self, condition, timeout: float = 120.0, what: str = "the condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.2)
        self.shot("timeout")
        raise AssertionError(f"timed out waiting for {what}")

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def give(self, path: Path, mime: str, how: str = "drop") -> None:
        """Drop a file on the page, or paste it."""
        self.js(
            """const [b64, name, type, how] = arguments;
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type}));
            if (how === "paste") {
              document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true}));
            } else {
              window.dispatchEvent(new DragEvent("dragenter", {dataTransfer: dt}));
              window.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, cancelable: true}));
            }""",
            base64.b64encode(path.read_bytes()).decode(), path.name, mime, how,
        )  # fmt: skip

    def set_value(self, element_id: str, value) -> None:
        self.js("document.getElementById(arguments[0]).value = arguments[1]", element_id, value)

    def console_errors(self) -> list[dict]:
        """Console errors since the last call, less the failed requests a test provoked on purpose."""
        out = []
        for entry in self.driver.get_log("browser"):
            if entry["level"] != "SEVERE":
                continue
            expected = next((e for e in self.expected_network if e in entry["message"]), None)
            if entry.get("source") == "network" and expected:
                self.expected_network.remove(expected)
                continue
            out.append(entry)
        return out

    def last_answer(self):
        return self.all("article.assistant")[-1]

    def answer_state(self) -> dict | None:
        """The last answer's state, read in one go (the page re-renders it while it streams)."""
        return self.js(
            "const a = [...document.querySelectorAll('article.assistant')].pop();"
            "return a ? {streaming: a.classList.contains('streaming'), chunks: Number(a.dataset.chunks)} : null"
        )

    def wait_answer(self, timeout: float = 180.0):
        self.wait(lambda: (s := self.answer_state()) and not s["streaming"], timeout, "the answer")
        return self.last_answer()

    def send(self, text: str) -> None:
        box = self.find("#composer-text")
        box.click()
        box.send_keys(text + "\n")  # Enter sends


@pytest.fixture(scope="module")
def page(server, shots):
    webdriver = pytest.importorskip("selenium.webdriver")
    driver_path = shutil.which("chromedriver")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not driver_path or not browser:
        if os.environ.get("CI"):  # .ci/run installs them: their absence there is a failure, not a skip
            pytest.fail("CI needs Debian's chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,860", "--autoplay-policy=no-user-gesture-required", "--mute-audio"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield Page(driver, server.url, shots)
    finally:
        driver.quit()


@pytest.fixture(autouse=True)
def _no_console_errors(request):
    yield
    if "page" in request.fixturenames:
        p = request.getfixturevalue("page")
        errors = p.console_errors()
        assert errors == [], errors


def test_the_key_is_asked_once_and_kept_for_the_session(page):
    page.driver.get(page.url + "/")
    dialog = page.wait(
        lambda: page.js("return document.getElementById('key-dialog').open"), 30, "the key dialog"
    )
    assert dialog and page.js("return document.activeElement.id") == "key-input"
    page.shot("01-api-key")
    page.find("#key-input").send_keys("wrong")
    page.find("#key-save").click()
    page.expected_network.append("status of 401")
    page.wait(lambda: page.find("#key-error").text == "incorrect API key", 30, "the server's 401 message")
    field = page.find("#key-input")
    field.clear()
    field.send_keys(KEY + "\n")  # Enter submits the dialog
    page.wait(lambda: page.js("return document.body.dataset.ready") == "true", 30, "the page")
    assert page.find("#model").text == "tiny-vl"
    page.driver.refresh()  # the same tab: the key is kept for the session, not asked again
    page.wait(lambda: page.js("return document.body.dataset.ready") == "true", 30, "the page after a reload")
    assert not page.js("return document.getElementById('key-dialog').open")
    assert page.js("return sessionStorage.getItem('glimpse.apiKey')") == KEY
    assert page.js("return localStorage.getItem('glimpse.apiKey')") is None
    page.shot("02-empty")


def test_a_streamed_answer_with_its_reasoning_folded_under_it(page):
    page.find("#think").click()  # /think on
    assert page.js("return document.getElementById('think').checked")
    page.find("#settings-toggle").click()
    extra = {
        "glimpse_forced_output": "The user says hello.\nA short greeting fits.\n</think>\nHello! **Nice** to meet you."
    }
    page.set_value("set-extra", json.dumps(extra))
    page.send("Say hello")
    answer = page.wait_answer()
    assert int(answer.get_attribute("data-chunks")) > 3  # many SSE events, not one body
    assert answer.find_element(page.By.CSS_SELECTOR, ".answer").text == "Hello! Nice to meet you."
    assert answer.find_element(page.By.CSS_SELECTOR, ".answer strong").text == "Nice"
    reasoning = answer.find_element(page.By.CSS_SELECTOR, "details.reasoning")
    assert reasoning.get_attribute("open") is None  # folded
    order = page.js("return [...arguments[0].children].map((c) => c.className)", answer)
    assert order.index("answer") < order.index("reasoning")  # under the answer
    reasoning.find_element(page.By.TAG_NAME, "summary").click()
    assert "A short greeting fits." in reasoning.text
    assert "/think" in answer.find_element(page.By.CSS_SELECTOR, ".meta").text
    page.shot("03-reasoning")
    page.find("#think").click()  # /think off again


def test_stop_and_regenerate(page, server):
    page.set_value(
        "set-extra", json.dumps({"glimpse_forced_output": "and then " * 1000})
    )  # long, no early end
    page.set_value("set-max-tokens", "4000")
    page.send("Tell me a long story")
    page.wait(lambda: (page.answer_state() or {}).get("chunks", 0) > 2, 60, "a few chunks")
    page.find("#stop").click()
    answer = page.wait_answer(30)
    assert "Stopped." in answer.text and page.find("#send").is_displayed()
    wait_idle(server)  # the server aborted the request when the page let go of it
    count = len(page.all("article.message"))
    page.set_value("set-max-tokens", "64")
    page.set_value("set-extra", json.dumps({"glimpse_forced_output": "Once upon a time."}))
    page.find("article.assistant:last-child .regenerate").click()
    answer = page.wait_answer()
    assert answer.find_element(page.By.CSS_SELECTOR, ".answer").text == "Once upon a time."
    assert len(page.all("article.message")) == count  # replaced, not added


def test_image_pdf_and_video_with_the_frames_on_a_timeline(page, inputs):
    page.find("#new-chat").click()
    page.set_value("set-max-tokens", "64")
    page.set_value("set-fps", "2")
    page.set_value("set-frames", "16")
    page.set_value("set-tiles", "1")
    page.give(inputs["image"], "image/png", how="paste")
    page.give(inputs["pdf"], "application/pdf")
    page.give(inputs["video"], "video/mp4")
    page.wait(lambda: len(page.all("#tray .tray-item:not(.loading) img")) == 3, 60, "three thumbnails")
    details = [e.text for e in page.all("#tray .tray-detail")]
    assert details[1].startswith("2 pages") and details[2].startswith("0:08"), details
    page.shot("04-attachments")
    cited = "The square turns green between 0:04 and 0:06, after the cut at 4.0 seconds."
    page.set_value("set-extra", json.dumps({"glimpse_forced_output": cited}))
    page.send("When does the colour change?")
    answer = page.wait_answer()
    assert answer.find_element(page.By.CSS_SELECTOR, ".answer").text == cited
    assert "video tokens:" in answer.find_element(page.By.CSS_SELECTOR, ".meta").text

    # The frames on the timeline are the ones the server sampled, at their true times.
    expected = sampled_frames(page.url, inputs["video"])
    panel = page.find(".video-panel")
    page.wait(
        lambda: panel.get_attribute("data-frames-drawn") == str(len(expected["seconds"])), 60, "the frames"
    )
    times = [float(f.get_attribute("data-t")) for f in page.all(".video-panel .frame")]
    assert times == pytest.approx(expected["seconds"]) and len(times) == 16
    assert len(page.all(".video-panel .frame img")) == 16 and len(page.all(".video-panel .tick")) == 16
    kept = f"{expected['tokens_kept']:,} of {expected['tokens']:,} video tokens kept"
    assert kept in panel.find_element(page.By.TAG_NAME, "figcaption").text

    # A cited range seeks the player (by mouse, then by keyboard).
    links = page.all("article.assistant a.time")
    assert [(float(a.get_attribute("data-start")), float(a.get_attribute("data-end"))) for a in links] == [
        (4, 6),
        (4, 4),
    ]
    player_time = "return document.querySelector('.video-panel video').currentTime"
    page.js("document.querySelector('.video-panel video').currentTime = 0")
    links[0].click()
    page.wait(lambda: 4.0 <= page.js(player_time) <= 6.3, 20, "the player at 0:04")
    assert page.find(".video-panel .range").is_displayed()
    page.find("#settings-close").click()
    page.js("document.querySelector('.video-panel video').pause()")  # pausing sends a last timeupdate
    time.sleep(0.5)
    at, current = page.js(
        "return [document.querySelector('.video-panel video').currentTime,"
        " [...document.querySelectorAll('.video-panel .frame')].findIndex((f) => f.classList.contains('current'))]"
    )
    assert current == min(15, int((at + 0.05) * 2))  # the frame on screen is marked in the strip
    page.shot("05-video-timeline")
    page.js("const v = document.querySelector('.video-panel video'); v.pause(); v.currentTime = 1")
    from selenium.webdriver.common.keys import Keys

    links[1].send_keys(Keys.ENTER)
    page.wait(lambda: 4.0 <= page.js(player_time) <= 6.3, 20, "the player at 4.0 s by keyboard")
    page.js("document.querySelector('.video-panel video').pause()")


def sampled_frames(url: str, video: Path) -> dict:
    """What the server samples from `video` at 2 fps, at most 16 frames, EVS 0.5 (the page's settings)."""
    body = {
        "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()}},
            {"type": "text", "text": "?"}]}],
        "max_tokens": 1, "video_pruning_rate": 0.5, "media_io_kwargs": {"video": {"fps": 2, "num_frames": 16}},
    }  # fmt: skip
    r = httpx.post(
        f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
    )
    assert r.status_code == 200, r.text
    (media,) = r.json()["media"]  # the media report reaches HTTP
    assert media["type"] == "video" and len(media["frame_indices"]) == len(media["seconds"])
    return media


def test_server_errors_are_shown_in_the_servers_words(page):
    page.set_value("set-extra", json.dumps({"max_tokens": 0}))
    page.send("hello")
    page.expected_network.append("status of 400")
    answer = page.wait_answer()
    shown = answer.find_element(page.By.CSS_SELECTOR, ".error .error-message").text
    r = httpx.post(f"{page.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                   json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 0})  # fmt: skip
    assert r.status_code == 400 and shown == r.json()["error"]["message"]
    assert answer.find_element(page.By.CSS_SELECTOR, ".error .error-label").text == "Error 400"
    page.shot("06-server-error")
    page.set_value("set-extra", "")


def test_a_screenshot_for_the_readme(page, tmp_path):
    """A clean conversation about one video: reasoning, an answer citing times, the player at a cited range."""
    video = make_video(tmp_path / "scenes.mp4", seconds=12.0, fps=8, scene_seconds=4.0, size=(320, 180))
    page.find("#new-chat").click()
    page.find("#think").click()
    page.set_value("set-max-tokens", "400")
    page.give(video, "video/mp4")
    page.wait(lambda: page.all("#tray .tray-item:not(.loading) img"), 30, "the thumbnail")
    reasoning = "Frames 1 to 6 are red, frames 7 to 11 green and frames 12 to 16 blue; a white square moves right in each."
    answer = (
        "The background changes colour twice: from **red to green at 0:04** and from **green to blue at 0:08**. "
        "The green scene runs from 0:04 to 0:08; in each scene the white square crosses from left to right."
    )
    page.set_value("set-extra", json.dumps({"glimpse_forced_output": f"{reasoning}\n</think>\n{answer}"}))
    page.send("When does the background change colour?")
    page.wait_answer()
    page.wait(lambda: page.all(".video-panel[data-frames-drawn='16']"), 60, "the frames")
    page.find("#think").click()
    page.all("article.assistant a.time")[2].click()  # 0:04 to 0:08
    page.wait(
        lambda: page.js("return document.querySelector('.video-panel video').currentTime") > 5.0,
        20,
        "playback",
    )
    page.js("document.querySelector('.video-panel video').pause()")
    page.js("document.querySelector('article.assistant details.reasoning').open = true")
    page.js("document.getElementById('messages').scrollTop = 1e6")
    page.js("document.activeElement.blur()")
    page.driver.set_window_size(1280, 980)
    try:
        page.js("document.querySelector('.video-panel').scrollIntoView({block: 'start'})")
        time.sleep(0.3)
        page.shot("00-readme")
    finally:
        page.driver.set_window_size(1280, 860)
    page.set_value("set-extra", "")


def test_the_conversation_is_kept_in_the_browser(page):
    page.driver.refresh()
    page.wait(lambda: page.js("return document.body.dataset.ready") == "true", 30, "the page")
    titles = [e.text for e in page.all("#conversations .conversation-title")]
    assert titles == ["When does the background change colour?", "When does the colour change?", "Say hello"]
    assert page.find(".video-panel video").get_attribute("src").startswith("blob:")  # the file came back too
    page.wait(lambda: page.find(".video-panel").get_attribute("data-frames-drawn") == "16", 60, "the frames")
    assert len(page.all("article.assistant")) == 1 and page.all("details.reasoning")
    page.all("#conversations .conversation-open")[1].click()
    page.wait(lambda: page.find(".video-panel").get_attribute("data-frames-drawn") == "16", 60, "the frames")
    assert len(page.all("article.assistant")) == 2  # the answer and the error
    assert page.all("article.assistant .error")
    page.all("#conversations .conversation-open")[2].click()
    page.wait(lambda: "Hello! Nice to meet you." in page.find("#messages").text, 10, "the first conversation")


def test_documents_fields_beside_their_pages(page, inputs):
    tab = page.find("#tab-chat")
    tab.click()
    from selenium.webdriver.common.keys import Keys

    tab.send_keys(Keys.ARROW_RIGHT)  # the tabs follow the arrow keys
    assert (
        page.js("return document.activeElement.id") == "tab-docs" and page.find("#view-docs").is_displayed()
    )
    page.give(inputs["pdf"], "application/pdf")
    page.give(inputs["image"], "image/png")
    page.wait(lambda: len(page.all("#docs-list .page-thumb img")) == 3, 60, "the page thumbnails")
    page.set_value("schema", json.dumps(DOC_SCHEMA, indent=2))
    page.set_value("ex-tiles", "1")
    page.set_value("ex-extra", json.dumps({"max_tokens": 300, "max_steps": 1, "max_tokens_per_step": 4}))
    page.find("#extract").click()
    page.wait(lambda: page.find("#extract-status").text.startswith("Done"), 300, "the extraction")
    cards = page.all(".result-card")
    assert [c.get_attribute("data-file") for c in cards] == ["invoice.pdf", "receipt.png"]
    for card, pages in zip(cards, (2, 1)):
        assert not card.find_elements(page.By.CSS_SELECTOR, ".error-text"), card.text
        for field in card.find_elements(page.By.CSS_SELECTOR, "dd[data-field]"):
            number = int(field.get_attribute("data-page"))
            assert 1 <= number <= pages
            group = field.find_element(page.By.XPATH, "ancestor::div[@class='page-group']")
            assert group.find_element(page.By.CSS_SELECTOR, ".page-thumb").get_attribute("data-page") == str(
                number
            )
        names = {
            f.get_attribute("data-field") for f in card.find_elements(page.By.CSS_SELECTOR, "dd[data-field]")
        }
        assert {"title", "count"} <= names
    page.js("document.getElementById('extract-results').scrollIntoView()")
    page.shot("07-documents")


def test_the_video_analyst_uploads_shows_progress_and_opens_the_report(page, inputs):
    page.find("#tab-video").click()
    page.give(inputs["video"], "video/mp4")
    page.wait(lambda: "0:08" in page.find("#video-picked").text, 30, "the picked video")
    page.set_value("an-question", "What colour is the square?")
    page.set_value("an-segment", "4")
    page.set_value("an-fps", "0.5")
    page.set_value("an-frames", "2")
    small = {"max_chars": 1, "max_items": 0, "notes_max_tokens": 300, "answer_max_tokens": 300, "max_steps": 1,
             "max_tokens_per_step": 4}  # fmt: skip
    page.set_value("an-extra", json.dumps(small))
    page.find("#analyse").click()
    stages = set()

    def reported() -> bool:
        stages.add(page.find("#analyst-status").text)
        return page.find("#report").is_displayed() or bool(page.find("#analyst-error").text)

    page.wait(reported, 300, "the report")
    assert page.find("#analyst-error").text == ""
    assert any(s.startswith(("Looking for scene changes", "Writing notes", "Answering")) for s in stages), (
        stages
    )
    frame = page.find("#report-frame")
    page.driver.switch_to.frame(frame)
    try:
        page.wait(
            lambda: page.js("return document.getElementById('player').readyState") >= 1,
            30,
            "the report's video",
        )
        assert page.js("return document.getElementById('player').src").startswith("blob:")
        assert len(page.all("#timeline .kf")) == 2  # two segments of 4 s
    finally:
        page.driver.switch_to.default_content()
    page.js("document.getElementById('report').scrollIntoView()")
    page.shot("08-video-analyst")
    jobs = page.all("#jobs .job")
    assert jobs and "done" in jobs[0].text


def test_a_phone_sized_window(page):
    page.find("#tab-chat").click()
    page.driver.set_window_size(390, 844)
    try:
        page.wait(lambda: page.find("#menu").is_displayed(), 10, "the menu button")
        assert page.js("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        page.wait(lambda: not page.find("#sidebar").is_displayed(), 5, "the sidebar to fold away")
        page.js("document.querySelector('.messages').scrollTop = 0")
        page.shot("09-phone-chat")
        page.find("#menu").click()
        page.wait(lambda: page.find("#sidebar").is_displayed(), 5, "the sidebar")
        assert page.find("#menu").get_attribute("aria-expanded") == "true"
        page.shot("10-phone-conversations")
        page.find("#sidebar-close").click()
        page.wait(lambda: not page.find("#sidebar").is_displayed(), 5, "the sidebar to close")
        page.find("#menu").click()
        page.wait(lambda: page.find("#sidebar").is_displayed(), 5, "the sidebar")
        from selenium.webdriver.common.keys import Keys

        page.find("#new-chat").send_keys(Keys.ESCAPE)  # Escape closes it too, and gives the focus back
        page.wait(lambda: not page.find("#sidebar").is_displayed(), 5, "the sidebar to close")
        assert page.js("return document.activeElement.id") == "menu"
        page.find("#tab-docs").click()
        assert page.js("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        page.shot("11-phone-documents")
    finally:
        page.driver.set_window_size(1280, 860)
        page.find("#tab-chat").click()


def test_every_control_has_a_name(page):
    unnamed = page.js(
        """const named = (e) => (e.getAttribute("aria-label") || "").trim() || e.getAttribute("aria-labelledby")
             || (e.labels && [...e.labels].some((l) => l.textContent.trim())) || (e.textContent || "").trim()
             || (e.title || "").trim();
        return [...document.querySelectorAll("button, input, textarea, select, a[href], [role=tab], iframe")]
          .filter((e) => e.type !== "file" && !(e.tagName === "IFRAME" ? e.title : named(e)))
          .map((e) => e.outerHTML.slice(0, 120));"""
    )
    assert unnamed == []
    images = page.js(
        "return [...document.querySelectorAll('img:not([alt])')].map((e) => e.outerHTML.slice(0, 80))"
    )
    assert images == []


def test_dark_theme(page):
    page.driver.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
    )
    try:
        background = page.js("return getComputedStyle(document.documentElement).backgroundColor")
        assert background == "rgb(15, 18, 22)"
        page.all("#conversations .conversation-open")[0].click()
        page.js("document.querySelector('.video-panel').scrollIntoView({block: 'start'})")
        page.shot("12-dark")
    finally:
        page.driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
