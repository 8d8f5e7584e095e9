"""The playground page in a real headless browser (Debian's chromium + chromedriver through selenium)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import PROMPTS, Live

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTEFACTS = Path(os.environ.get("LORAKIT_TEST_ARTEFACTS", "test-artefacts"))


def test_the_page_is_self_contained(live: Live) -> None:
    r = httpx.get(live.url + "/")  # static, no data in it: served without the key; its API calls send it
    assert r.status_code == 200 and "lorakit playground" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # no CDN, no external fonts
    assert "connect-src 'self'" in r.headers["content-security-policy"]


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason="needs chromium and chromium-driver (make test installs both when root)")
def test_chat_in_a_headless_browser_streams_the_answer(live: Live, reference, tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,800", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(live.url + "/")
        wait = WebDriverWait(driver, 30)
        key = driver.find_element(By.ID, "api-key")
        key.send_keys(live.key)
        driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
        wait.until(lambda d: "beta" in [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#model option")])
        Select(driver.find_element(By.ID, "model")).select_by_value("beta")
        driver.find_element(By.ID, "temperature").clear()
        driver.find_element(By.ID, "temperature").send_keys("0")
        driver.find_element(By.ID, "max-tokens").clear()
        driver.find_element(By.ID, "max-tokens").send_keys("24")
        driver.find_element(By.ID, "compare").click()  # side by side: the base and beta get the same prompt
        driver.execute_script(  # counts the answer's text updates: streamed answers grow piece by piece
            "window.updates = 0; new MutationObserver((ms) => ms.forEach((m) => {"
            " if (m.target.classList && m.target.classList.contains('assistant')) window.updates++; }))"
            ".observe(document.getElementById('panes'), {childList: true, subtree: true});")
        driver.find_element(By.ID, "input").send_keys(PROMPTS[1])
        driver.find_element(By.ID, "send").click()
        wait.until(ec.element_to_be_clickable((By.ID, "send")))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-state="done"]')) == 2)
        answers = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")]
        titles = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".pane h2")]
        assert titles == [str(live.served.model), "beta"]
        # the page shows text as the DOM renders it (white space collapsed at the ends)
        assert answers == [reference[str(live.served.model)][PROMPTS[1]].strip(), reference["beta"][PROMPTS[1]].strip()]
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
        assert driver.execute_script("return window.updates") > 4  # two answers, several pieces each
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        for where in (tmp_path / "playground.png", ARTEFACTS / "serve-playground.png"):
            assert driver.save_screenshot(str(where)) and where.stat().st_size > 1000
    finally:
        driver.quit()
