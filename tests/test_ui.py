"""The web page at /ui (serving/ui/) in a real headless browser (Debian's chromium + chromedriver, Selenium) against
a real `bentoml serve`: what it shows for each file is what /classify answers, errors stay next to their file,
names are text, it fits a phone, and it asks for the token when the service wants one.

Without the browser the tests skip (they fail under CI=true: .ci/run installs it). The first test leaves its
screenshots (desktop and phone) in its tmp_path."""
import base64
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
TOKEN = "t0ken"
WAIT_S = 30


@pytest.fixture(scope="session", autouse=True)   # before the (session) model store is made
def browser_installed():
    """Before any server starts: skip where there is no browser, fail under CI, where there must be one."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        reason = f"no browser for the web page's tests: {' and '.join(missing)} missing " \
                 "(apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(argument)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SE_OFFLINE", "true")   # Selenium Manager must not download a browser or a driver
        # Chromium leaves a folder for its singleton socket in TMPDIR: one under pytest's, which pytest cleans up.
        tmpdir = str(tmp_path_factory.mktemp("chromium"))
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER), env={**os.environ, "TMPDIR": tmpdir}),
                                  options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(onnx_server):
    return onnx_server


def write_image(path, pixels):
    Image.fromarray(pixels).save(path)
    return path


def images(folder):
    """Real files of different content and format; Chromium cannot show the TIFF."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    gradient = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 255 - ramp[:, None]), axis=-1)
    return {"png": write_image(folder / "noise.png", rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)),
            "jpeg": write_image(folder / "gradient.jpg", gradient),
            "tiff": write_image(folder / "flat.tif", np.full((40, 40, 3), (30, 160, 60), np.uint8))}


def api_top5(url, path, headers=None):
    """(class name, shown probability) of /classify's top 5 for the file, as the page should show them."""
    with open(path, "rb") as file:
        response = requests.post(f"{url}/classify", files={"images": (path.name, file)}, headers=headers, timeout=30)
    response.raise_for_status()
    return [(c["class_name"], f"{c['probability'] * 100:.1f} %") for c in response.json()["predictions"][0]["top5"]]


def cards(driver, name):
    """The result cards of the file NAME (its name as the page shows it)."""
    return [c for c in driver.find_elements(By.CSS_SELECTOR, "#results .card")
            if c.find_element(By.CLASS_NAME, "file-name").text == name]


def card(driver, name):
    matches = cards(driver, name)
    assert len(matches) == 1, f"{len(matches)} cards for {name!r}"
    return matches[0]


def finished(driver, name):
    """The card of NAME once it shows a prediction or an error."""
    def done(_):
        found = cards(driver, name)
        return found[0] if len(found) == 1 and found[0].find_elements(By.CSS_SELECTOR, ".top5, .error") else False
    WebDriverWait(driver, WAIT_S).until(done, f"no prediction or error for {name!r}")
    return card(driver, name)


def shown_top5(card_element):
    return [(row.find_element(By.CLASS_NAME, "class-name").text, row.find_element(By.CLASS_NAME, "probability").text)
            for row in card_element.find_elements(By.CSS_SELECTOR, ".top5 li")]


def shown_facts(driver):
    return {item.find_element(By.TAG_NAME, "dt").text: item.find_element(By.TAG_NAME, "dd").text
            for item in driver.find_elements(By.CSS_SELECTOR, "#model-facts > div")}


def upload(driver, *paths):
    driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in paths))


def open_page(driver, url):
    """The page, fresh (no results yet), once it has asked /info."""
    driver.get(f"{url}/ui")
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "model-facts").is_displayed()
                                        or d.find_element(By.ID, "token-form").is_displayed())


def test_the_page_and_its_assets_are_served_as_such(server):
    page = requests.get(f"{server}/ui", timeout=10)
    assert page.headers["Content-Type"].startswith("text/html") and page.headers["Cache-Control"] == "no-cache"
    assert '<input id="files" type="file" multiple' in page.text
    for asset, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        response = requests.get(f"{server}/ui/assets/{asset}", timeout=10)
        assert response.headers["Content-Type"].startswith(kind) and response.headers["Cache-Control"] == "no-cache"
    assert requests.get(f"{server}/ui/assets/..%2Fservice.py", timeout=10).status_code == 404
    assert "/ui" not in requests.get(f"{server}/docs.json", timeout=10).json()["paths"]   # not part of the API


def test_the_header_shows_the_served_model(browser, server):
    info = requests.get(f"{server}/info", timeout=10).json()
    open_page(browser, server)
    facts = shown_facts(browser)
    assert facts["model"] == info["model"] and facts["backend"] == info["backend"]
    assert facts["classes"] == str(len(info["metadata"]["classes"]))
    assert ("test accuracy (measured)" in facts) == ("test_acc" in info["metadata"])
    tta = info["metadata"].get("tta")   # shown only when the model has one ("none" is no augmentation)
    assert facts.get("test-time augmentation") == (tta if tta not in (None, "none") else None)
    assert browser.find_element(By.LINK_TEXT, "API documentation (Swagger UI)").get_attribute("href") == f"{server}/"


def test_each_file_shows_the_top5_that_classify_answers(browser, server, tmp_path):
    files = images(tmp_path)
    expected = {path.name: api_top5(server, path) for path in files.values()}
    assert expected["noise.png"] != expected["gradient.jpg"]   # else the test could not tell the files apart
    open_page(browser, server)
    upload(browser, *files.values())
    for name, top5 in expected.items():
        assert shown_top5(finished(browser, name)) == top5, name
    assert card(browser, "noise.png").find_element(By.TAG_NAME, "img").get_attribute("src").startswith("blob:")
    assert card(browser, "flat.tif").find_element(By.CLASS_NAME, "placeholder").text == "no preview"
    browser.save_screenshot(str(tmp_path / "ui.png"))   # an artifact of the run


def test_a_file_dropped_on_the_page_is_classified(browser, server, tmp_path):
    dropped = images(tmp_path)["jpeg"]
    open_page(browser, server)
    browser.execute_script("""   // what the browser does when a file is dragged from the desktop onto the page
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], arguments[1], {type: "image/jpeg"}));
        document.querySelector("main").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
        """, base64.b64encode(dropped.read_bytes()).decode(), dropped.name)
    assert shown_top5(finished(browser, dropped.name)) == api_top5(server, dropped)


def test_a_bad_file_shows_its_error_and_the_page_goes_on(browser, server, tmp_path):
    open_page(browser, server)
    (tmp_path / "notes.txt").write_text("not a picture")
    upload(browser, tmp_path / "notes.txt")
    assert "not an image" in finished(browser, "notes.txt").find_element(By.CLASS_NAME, "error").text
    assert not card(browser, "notes.txt").find_elements(By.CLASS_NAME, "top5")
    later = write_image(tmp_path / "later.bmp", np.full((32, 32, 3), (200, 40, 90), np.uint8))
    upload(browser, later)
    assert shown_top5(finished(browser, "later.bmp")) == api_top5(server, later)
    assert card(browser, "notes.txt").find_element(By.CLASS_NAME, "error").is_displayed()   # still next to its file


def test_a_busy_server_is_said_in_words_and_try_again_works(browser, server, tmp_path):
    open_page(browser, server)
    browser.execute_script("""   // the next /classify answer is a 503, as the service's overload answer
        const realFetch = window.fetch;
        window.fetch = (url, options) => {
          if (!String(url).endsWith("classify")) return realFetch(url, options);
          window.fetch = realFetch;
          return Promise.resolve(new Response('{"error": "server busy: ..."}',
                                              {status: 503, headers: {"Retry-After": "7"}}));
        };""")
    busy = images(tmp_path)["jpeg"]
    upload(browser, busy)
    error = finished(browser, busy.name).find_element(By.CLASS_NAME, "error")
    assert error.text.startswith("server busy, try again in 7 s")
    error.find_element(By.TAG_NAME, "button").click()
    WebDriverWait(browser, WAIT_S).until(lambda d: card(d, busy.name).find_elements(By.CLASS_NAME, "top5"))
    assert shown_top5(card(browser, busy.name)) == api_top5(server, busy)
    assert not card(browser, busy.name).find_elements(By.CLASS_NAME, "error")


def test_file_names_are_text_and_the_page_fits_a_phone(browser, server, tmp_path):
    hostile = write_image(tmp_path / "<img src=x onerror=alert(1)>.png", np.zeros((32, 32, 3), np.uint8))
    long_name = shutil.copy(hostile, tmp_path / ("holiday_photo_" * 10 + ".png"))   # no space, no hyphen
    open_page(browser, server)
    upload(browser, hostile, long_name)
    assert shown_top5(finished(browser, hostile.name)) == api_top5(server, hostile)
    finished(browser, long_name.name)
    assert not browser.find_elements(By.CSS_SELECTOR, "img[src='x'], #results .file-name *")
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text

    # 375 CSS px wide, as a phone: the long name wraps instead of widening the page.
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 375, "height": 812, "deviceScaleFactor": 1, "mobile": True})
    try:
        width, scroll_width = browser.execute_script("return [innerWidth, document.documentElement.scrollWidth]")
        browser.save_screenshot(str(tmp_path / "ui-phone.png"))
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert width == 375 and scroll_width <= width, (width, scroll_width)


def test_the_page_asks_for_the_token_and_then_works(browser, start_server, tmp_path):
    url = start_server({"CIFAR100_API_TOKEN": TOKEN, "CIFAR100_BACKEND": "onnx"})
    assert requests.get(f"{url}/info", timeout=10).status_code == 401
    for path in ("/ui", "/ui/assets/app.js", "/ui/assets/style.css"):   # the page itself needs no token
        assert requests.get(url + path, timeout=10).status_code == 200, path
    open_page(browser, url)   # a new origin (another port): no token stored
    form = browser.find_element(By.ID, "token-form")
    assert form.is_displayed() and not browser.find_element(By.ID, "model-facts").is_displayed()
    assert browser.find_element(By.ID, "token").get_attribute("type") == "password"

    early = images(tmp_path)["jpeg"]   # chosen before the token: refused with 401, held, sent again after it
    upload(browser, early)
    WebDriverWait(browser, WAIT_S).until(
        lambda d: card(d, early.name).find_element(By.CLASS_NAME, "status").text == "waiting for the API token…")

    browser.find_element(By.ID, "token").send_keys("guess")
    form.find_element(By.TAG_NAME, "button").click()
    WebDriverWait(browser, WAIT_S).until(
        lambda d: "not valid" in d.find_element(By.ID, "token-error").text, "a wrong token is not reported")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    form.find_element(By.TAG_NAME, "button").click()
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "model-facts").is_displayed(),
                                         "the model's facts do not show after the token")
    assert not form.is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('cifar100-api-token')") == TOKEN

    expected = api_top5(url, early, {"Authorization": f"Bearer {TOKEN}"})
    assert shown_top5(finished(browser, early.name)) == expected
    later = shutil.copy(early, tmp_path / "later.jpg")
    upload(browser, later)
    assert shown_top5(finished(browser, later.name)) == expected
