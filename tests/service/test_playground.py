"""The playground (``GET /``) and the offline API docs (``/docs``, ``/redoc``): served by the app, nothing
loaded from another host, and the playground works in a real headless Chromium.

What "references no other host" means here, precisely:

* **HTML** (the three pages): every ``src``, ``href``, ``action``/``formaction``, ``srcset``,
  ``poster`` and ``data`` attribute, every ``url(…)`` in inline styles and ``style=`` attributes, and
  every absolute URL in inline scripts must resolve to the server's origin or be a ``data:`` URL.
* **CSS** that the pages load: every ``url(…)`` and ``@import`` likewise.
* **JS** that the pages load (the Swagger UI and ReDoc bundles, ~2.6 MB minified): they hold URL
  *strings* that are never fetched — JSON-Schema ``$id``s, XML namespaces, RFC and licence links,
  example values, the ``href`` of "API docs by Redocly". Such strings are allowed; two are *fetch*
  candidates: Swagger UI's online validator (off: ``validatorUrl`` is null, and the BaseLayout that
  FastAPI uses never renders the badge) and the ``<img>`` of Redocly's logo that ReDoc 2 always
  renders from its CDN. No static scan of minified JS can prove a string is never fetched, so the
  JS is held to two checks: no ``url(…)``/``@import`` of another host in it (CSS-in-JS), and the
  pages' Content-Security-Policy (checked here) lets the browser fetch from this origin only
  (``'self'``, ``data:``, ``blob:``, inline hashes). The browser test then records every request
  Chromium makes while rendering each page (DevTools ``Network`` events): each one goes to the server
  or is refused by the browser for the CSP (``blockedReason == "csp"``: Redocly's logo), so no request
  leaves the host. Chromium also runs with every host name but 127.0.0.1 unresolvable.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from lowdiff.configs import FASHION_MNIST_CLASSES
from lowdiff.service.app import create_app
from lowdiff.service.settings import ServeSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAGES = ("/", "/docs", "/redoc")
URL_ATTRIBUTES = {"src", "href", "action", "formaction", "poster", "data", "srcset"}
CSS_URL = re.compile(r"""url\(\s*(['"]?)(.*?)\1\s*\)|@import\s+(['"])(.*?)\3""", re.IGNORECASE)
ABSOLUTE_URL = re.compile(r"""(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s'"`)]*""")
# CSS inside JS (styled-components): a url(…) or @import of an absolute URL with a host name.
JS_CSS_FETCH = re.compile(r"""(?:url\(|@import\s+)\s*\\?['"]?(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}""")
ALLOWED_SOURCES = re.compile(r"^('self'|'none'|'unsafe-inline'|'sha256-[A-Za-z0-9+/=]+'|data:|blob:)$")


@pytest.fixture(scope="module")
def server(tiny_fast_model, live_server):
    """The tiny fast model with Fashion-MNIST's class names, on a live loopback server."""
    model = tiny_fast_model()
    model.config = dataclasses.replace(model.config, class_names=FASHION_MNIST_CLASSES)
    with live_server(create_app(ServeSettings(max_batch=16, max_delay_ms=0), model=model)) as srv:
        srv.wait_ready()
        yield srv


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts: list[str] = []  # src of external scripts
        self.stylesheets: list[str] = []
        self.inline_scripts: list[str] = []
        self.inline_styles: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for name, value in attrs:
            if value is None:
                continue
            if name == "srcset":
                self.urls += [part.split()[0] for part in value.split(",") if part.strip()]
            elif name in URL_ATTRIBUTES:
                self.urls.append(value)
            elif name == "style":
                self.inline_styles.append(value)
        if tag == "script" and values.get("src"):
            self.scripts.append(values["src"] or "")
        if tag == "link" and "stylesheet" in (values.get("rel") or "") and values.get("href"):
            self.stylesheets.append(values["href"] or "")
        if tag in ("script", "style") and not values.get("src"):
            self._in = tag

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "script":
            self.inline_scripts.append(data)
        elif self._in == "style":
            self.inline_styles.append(data)


def css_urls(text: str) -> list[str]:
    return [m.group(2) if m.group(2) is not None else m.group(4) for m in CSS_URL.finditer(text)]


def foreign(urls: list[str], base: str) -> list[str]:
    """The URLs that resolve neither to ``base``'s origin nor to data: (what would leave the host)."""
    origin = urlsplit(base)
    out = []
    for url in urls:
        resolved = urlsplit(urljoin(base, url.strip()))
        if resolved.scheme == "data" or (resolved.scheme, resolved.netloc) == (origin.scheme, origin.netloc):
            continue
        out.append(url)
    return out


def csp_foreign_sources(policy: str) -> list[str]:
    sources = []
    for directive in filter(None, (d.strip() for d in policy.split(";"))):
        name, *values = directive.split()
        if name.endswith("-src") or name in ("base-uri", "form-action", "frame-ancestors"):
            sources += [f"{name} {v}" for v in values if not ALLOWED_SOURCES.match(v)]
    return sources


@pytest.mark.parametrize("path", PAGES)
def test_pages_are_served_and_reference_no_other_host(server, path) -> None:
    with server.client() as client:
        page = client.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        base = f"{server.url}{path}"
        refs = _Refs()
        refs.feed(page.text)
        assert refs.scripts or refs.inline_scripts, "every page runs a script"
        assert foreign(refs.urls, base) == []
        for style in refs.inline_styles:
            assert foreign(css_urls(style), base) == []
        for script in refs.inline_scripts:
            assert ABSOLUTE_URL.findall(script) == [], "an inline script names another host"
        # The browser may load from this origin only (the JS below is held to this, and the browser test).
        policy = page.headers["content-security-policy"]
        assert "default-src" in policy and csp_foreign_sources(policy) == []
        for href in refs.stylesheets:
            css = client.get(urljoin(base, href))
            assert css.status_code == 200 and "css" in css.headers["content-type"]
            assert foreign(css_urls(css.text), urljoin(base, href)) == []
        for src in refs.scripts:
            js = client.get(urljoin(base, src))
            assert js.status_code == 200 and "javascript" in js.headers["content-type"]
            assert JS_CSS_FETCH.findall(js.text) == [], src
        if path == "/":
            assert refs.scripts == [] and refs.stylesheets == [], "the playground is one self-contained page"


def test_pages_need_no_key_but_the_playground_sends_it(live_server, fake_engine) -> None:
    app = create_app(ServeSettings(api_key="s3cret"), engine=fake_engine())
    with live_server(app) as srv:
        srv.wait_ready()
        for path in (*PAGES, "/openapi.json"):
            assert httpx.get(srv.url + path).status_code == 200, path
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        html = httpx.get(srv.url + "/").text
        assert '"Authorization"] = "Bearer " + key' in html and "sessionStorage" in html


# ---------------------------------------------------------------------------- a real browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path):
    """Headless Debian chromium under Selenium, a fresh profile; nothing but 127.0.0.1 resolves."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1000,900",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def requests_made(driver) -> list[tuple[str, str | None]]:
    """(url, blockedReason or None) of every request since the last call (DevTools Network events)."""
    sent: dict[str, str] = {}
    blocked: dict[str, str] = {}
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message.get("method") == "Network.requestWillBeSent":
            sent[params["requestId"]] = params["request"]["url"]
        elif message.get("method") == "Network.loadingFailed" and params.get("blockedReason"):
            blocked[params["requestId"]] = params["blockedReason"]
    return [(url, blocked.get(rid)) for rid, url in sent.items()]


def assert_nothing_left_the_host(driver, server) -> list[str]:
    """Every network request (http, https, ws, wss) since the last call went to the server, or was refused by
    the browser for the page's CSP; → the refused URLs. (chrome://, data: and blob: are the browser's own.)"""
    made = [(url, why) for url, why in requests_made(driver) if urlsplit(url).scheme in ("http", "https", "ws", "wss")]
    assert made, "no request was recorded"
    outside = [(url, why) for url, why in made if not url.startswith(server.url + "/")]
    assert [item for item in outside if item[1] != "csp"] == [], "a request went to another host"
    return [url for url, _ in outside]


def wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def test_playground_generates_in_a_real_browser(server, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    requests_made(browser)  # from here on: what the page does (not the browser's start page)
    browser.get(server.url + "/")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#class option")) == 10)
    assert not browser.find_element(By.ID, "class").get_attribute("disabled")
    assert "Model tiny" in browser.find_element(By.ID, "model").text
    Select(browser.find_element(By.ID, "class")).select_by_visible_text("7 · Sneaker")
    count = browser.find_element(By.ID, "count")
    count.clear()
    count.send_keys("3")
    browser.find_element(By.ID, "seed").send_keys("5")
    browser.find_element(By.ID, "generate").click()

    shown = """return Array.from(document.querySelectorAll('#images img'))
        .map(i => [i.complete, i.naturalWidth, i.alt, i.getBoundingClientRect().width])"""
    wait(browser, lambda d: len(d.execute_script(shown)) == 3 and all(c for c, *_ in d.execute_script(shown)))
    images = browser.execute_script(shown)
    assert [alt for *_, alt, _ in images] == ["Sneaker, seed 5", "Sneaker, seed 6", "Sneaker, seed 7"]
    assert all(width == 32 and shown_width > 0 for _, width, _, shown_width in images)
    timings = browser.find_element(By.ID, "timings").text
    assert re.search(r"3 images from tiny, seeds 5–7: queue \d+ ms, compute \d+ ms, total \d+ ms", timings), timings
    assert browser.find_element(By.ID, "error").text == ""

    # An error is the JSON `error`, in one line; the images of the last success stay.
    seed = browser.find_element(By.ID, "seed")
    seed.clear()
    seed.send_keys("4294967295")
    seed.submit()  # the keyboard path: Enter in a field submits the form
    wait(browser, lambda d: d.find_element(By.ID, "error").text != "")
    error = browser.find_element(By.ID, "error").text
    assert error.startswith("Error: seed") and "\n" not in error, error
    assert browser.find_element(By.ID, "timings").text == ""
    assert assert_nothing_left_the_host(browser, server) == []
    # No script error and no CSP violation (the 422 above is logged too, as a "network" entry).
    console = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and e["source"] != "network"]
    assert console == [], console


def test_docs_render_offline_in_a_real_browser(server, browser) -> None:
    from selenium.webdriver.common.by import By

    requests_made(browser)
    browser.get(server.url + "/docs")
    title = ".swagger-ui .info .title"
    wait(browser, lambda d: "LowDiff Serve" in " ".join(e.text for e in d.find_elements(By.CSS_SELECTOR, title)))
    wait(browser, lambda d: "/generate" in [e.text for e in d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")])
    assert assert_nothing_left_the_host(browser, server) == []

    browser.get(server.url + "/redoc")
    wait(browser, lambda d: "LowDiff Serve" in "".join(e.text for e in d.find_elements(By.TAG_NAME, "h1")))
    wait(browser, lambda d: "/generate" in d.find_element(By.TAG_NAME, "body").text)
    refused = assert_nothing_left_the_host(browser, server)
    assert all(urlsplit(url).hostname == "cdn.redoc.ly" for url in refused), refused  # Redocly's logo only


def test_playground_streams_previews_in_a_real_browser(tiny_fast_model, live_server, browser) -> None:
    """With "Show previews" the page reads POST /generate/stream: drafts appear, then the same final
    images (pixels and alt text) as without it."""
    from selenium.webdriver.common.by import By

    model = tiny_fast_model()
    model.config = dataclasses.replace(model.config, class_names=FASHION_MNIST_CLASSES)
    settings = ServeSettings(max_batch=16, max_delay_ms=0, scheduler="staged")
    with live_server(create_app(settings, model=model)) as srv:
        srv.wait_ready()
        browser.get(srv.url + "/")
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#class option")) == 10)
        browser.find_element(By.ID, "seed").send_keys("5")
        count = browser.find_element(By.ID, "count")
        count.clear()
        count.send_keys("2")
        shown = "return Array.from(document.querySelectorAll('#images img')).map(i => [i.alt, i.src])"
        browser.find_element(By.ID, "generate").click()
        wait(browser, lambda d: "2 images from tiny" in d.find_element(By.ID, "timings").text)
        plain = browser.execute_script(shown)
        browser.find_element(By.ID, "previews").click()
        browser.find_element(By.ID, "generate").click()
        wait(browser, lambda d: "2 images from tiny" in d.find_element(By.ID, "timings").text
             and d.find_element(By.ID, "generate").is_enabled())  # fmt: skip
        streamed = browser.execute_script(shown)
        previews = int(browser.find_element(By.ID, "images").get_attribute("data-previews"))
        assert streamed == plain and [alt for alt, _ in plain] == ["T-shirt/top, seed 5", "T-shirt/top, seed 6"]
        assert previews >= 2  # at least one hand-off draft per image (the tiny model's cascade has stages)
        assert browser.find_element(By.ID, "error").text == ""
        console = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert console == [], console
