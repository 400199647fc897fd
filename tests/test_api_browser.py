"""The README's browser example, run by a real browser (Debian's headless ``chromium``):
a page on another origin uploads with ``fetch``, follows the job with ``EventSource`` on a
ticket URL, and fetches the cut-out through the output endpoint's 302. It checks CORS
(allowed origin, exposed headers), tickets and the redirect as a browser applies them."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from apistack import ApiServer
from servers import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# The README's example (HTTP API section), with a generated image for the file input and
# the results posted back to the page's own server.
PAGE = """<!doctype html><meta charset="utf-8"><title>ben2q</title><script type="module">
const api = API, key = KEY;
const report = (result) => fetch("/result", { method: "POST", body: JSON.stringify(result) });
try {
  const canvas = new OffscreenCanvas(96, 64);
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#3a7"; ctx.fillRect(0, 0, 96, 64);
  ctx.fillStyle = "#e42"; ctx.fillRect(30, 16, 36, 32);
  const fileInput = { files: [new File([await canvas.convertToBlob()], "photo.png",
                                       { type: "image/png" })] };
  const img = new Image();
  const states = [];

  const auth = { Authorization: `Bearer ${key}` };
  const form = new FormData();
  form.append("file", fileInput.files[0]);
  const created = await fetch(`${api}/v1/jobs`, { method: "POST", headers: auth, body: form });
  const job = await created.json();
  const ticket = await (await fetch(`${api}/v1/jobs/${job.id}/events/ticket`,
                                    { method: "POST", headers: auth })).json();
  const events = new EventSource(api + ticket.url);
  events.addEventListener("status", async (e) => {
    const record = JSON.parse(e.data);
    states.push(record.state);
    if (["succeeded", "partial", "failed", "cancelled"].includes(record.state)) {
      events.close();
      const cutout = await fetch(`${api}/v1/jobs/${job.id}/items/0/output`, { headers: auth });
      img.src = URL.createObjectURL(await cutout.blob());
      await img.decode();
      report({ status: created.status, location: created.headers.get("Location"),
               rate: created.headers.get("RateLimit"), states, final: record.state,
               output: cutout.status, type: cutout.headers.get("Content-Type"),
               width: img.naturalWidth, height: img.naturalHeight });
    }
  });
  events.onerror = () => { if (!states.length) report({ error: "EventSource failed" }); };
} catch (err) {
  report({ error: String(err) });
}
</script>"""


class _Page(BaseHTTPRequestHandler):
    page = b""
    results: list[dict] = []
    done = threading.Event()

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.page)))
        self.end_headers()
        self.wfile.write(self.page)

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).results.append(json.loads(body))
        type(self).done.set()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def page_port():
    return free_port()


@pytest.fixture(scope="module")
def cors_api(api_stack, page_port):
    """An API process that allows the page's origin; the output bucket allows browsers to
    follow presigned redirects (README: bucket CORS)."""
    origin = f"http://127.0.0.1:{page_port}"
    env = api_stack.env | {"BEN2Q_API_CORS_ORIGINS": json.dumps([origin])}
    api_stack.s3.put_bucket_cors(
        Bucket="api-out",
        CORSConfiguration={
            "CORSRules": [
                {
                    "AllowedOrigins": ["*"],
                    "AllowedMethods": ["GET"],
                    "AllowedHeaders": ["*"],
                    "MaxAgeSeconds": 600,
                }
            ]
        },
    )
    server = ApiServer(env, api_stack.logs / "api-browser.log").start()
    yield server
    server.stop()


def test_the_readme_browser_example_in_chromium(api_stack, cors_api, page_port, tmp_path):
    assert CHROMIUM, "chromium is not installed (scripts/setup.sh installs it)"
    key, token = api_stack.key("browser")
    _Page.page = (
        PAGE.replace("API", json.dumps(cors_api.url), 1)
        .replace("KEY", json.dumps(token), 1)
        .encode()
    )
    _Page.results, _Page.done = [], threading.Event()
    pages = ThreadingHTTPServer(("127.0.0.1", page_port), _Page)
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    browser = subprocess.Popen(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"http://127.0.0.1:{page_port}/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert _Page.done.wait(90), "the page reported nothing"
    finally:
        browser.kill()
        browser.wait(10)
        pages.shutdown()
    [result] = _Page.results
    assert "error" not in result, result
    assert result["status"] == 202 and result["location"].startswith("/v1/jobs/")
    assert result["rate"].startswith('"requests";r=')  # an exposed header
    assert result["states"][-1] == result["final"] == "succeeded"
    assert result["output"] == 200 and result["type"] == "image/png"
    assert (result["width"], result["height"]) == (96, 64)
