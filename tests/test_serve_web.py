"""The service's web page in headless Chromium: key, new context, streamed chat, ledger, forget, side by side."""

import shutil

import pytest
from conftest import save_tiny_dirs

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (pip install selenium)")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "no Chromium: install Debian's chromium and chromium-driver (make install does, as root)",
        allow_module_level=True,
    )

from selenium.webdriver.chrome.service import Service as DriverService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from genadapter.serve.launch import ServerProcess  # noqa: E402
from genadapter.serve.store import SQLiteStore  # noqa: E402

DOCUMENT = "The lighthouse of Vintry is painted green. Its keeper is called Orla Penhale."
QUESTION = "Who keeps the lighthouse?"
CONFIG = {"max_new_tokens": 16, "default_new_tokens": 8}
# Chromium's own connections are refused on machines without a network: switch them off
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    base, gen = save_tiny_dirs(tmp / "tiny")
    store = SQLiteStore(tmp / "contexts.db")
    key = store.create_key("browser")
    store.close()
    with ServerProcess(tmp / "contexts.db", base, gen, CONFIG, log_path=tmp / "server.log") as server:
        yield server, key


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=DriverService(CHROMEDRIVER))
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 60):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def test_page_adapts_chats_streaming_and_forgets(served, browser):
    server, key = served
    browser.get(server.url + "/")
    find = browser.find_element
    assert "401" not in find(By.ID, "status").text
    find(By.ID, "key").send_keys(key)
    browser.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
    find(By.ID, "document").send_keys(DOCUMENT)
    find(By.ID, "create").click()
    wait(browser, lambda d: "holds" in d.find_element(By.ID, "status").text)
    context_id = find(By.ID, "contexts").get_attribute("value")
    items = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#ledger li"))
    assert len(items) == 1 and DOCUMENT[:40] in items[0].text

    find(By.ID, "compare").click()
    find(By.ID, "prompt").send_keys(QUESTION)
    find(By.ID, "send").click()
    wait(browser, lambda d: d.find_element(By.ID, "status").text == "done")
    answers = {
        kind: find(By.CSS_SELECTOR, f".column[data-kind={kind}] .turn.assistant").text
        for kind in ("adapter", "base", "prompt")
    }
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, trust_env=False) as http:
        columns = [("adapter", context_id, None), ("base", "base", None), ("prompt", "base", DOCUMENT)]
        for kind, model, system in columns:
            messages = [{"role": "user", "content": QUESTION}]
            if system:
                messages.insert(0, {"role": "system", "content": system})
            body = {"model": model, "messages": messages}
            expected = http.post("/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
            assert answers[kind] == expected["content"].strip(), kind  # the page shows what the API answers

        find(By.CSS_SELECTOR, "#ledger button.forget").click()
        wait(browser, lambda d: d.find_element(By.ID, "status").text == "forgotten")
        wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, "#ledger li"))
        info = http.get(f"/v1/contexts/{context_id}").json()
        assert info["num_tokens"] == 0
