"""The chat page in a real browser (headless Chromium through selenium; skipped where either is absent):
it loads, sends a message, shows the streamed reply and the calculator call as its own block, keeps the
conversation across a reload, regenerates, and edits-and-resends."""
import shutil

import pytest

from serve_toys import calculator_script, save_run, scripted_gpt, start_server, stop_server

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium + chromedriver not installed "
                                 "(apt-get install chromium chromium-driver)")]


@pytest.fixture(scope="module")
def browser_and_url(tmp_path_factory, tiny_tokenizer_dir):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from nanochat.tokenizer import Tokenizer
    tok = Tokenizer.load(tiny_tokenizer_dir)
    model = scripted_gpt(calculator_script(tok), vocab=tok.get_vocab_size(), seq_len=256)
    run_dir = save_run(tmp_path_factory.mktemp("serve_web") / "run", model, tiny_tokenizer_dir)
    proc, url = start_server(run_dir)
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver, url
    finally:
        driver.quit()
        stop_server(proc)


def wait_for(driver, fn, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: fn(d))


def test_page_streams_a_reply_with_a_rendered_tool_call(browser_and_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    driver, url = browser_and_url
    driver.get(url + "/")
    driver.execute_script("localStorage.clear(); location.reload();")
    wait_for(driver, lambda d: d.find_element(By.ID, "model").text.startswith("nanochat-"))
    driver.find_element(By.ID, "temperature").clear()
    driver.find_element(By.ID, "temperature").send_keys("0")
    box = driver.find_element(By.ID, "input")
    box.send_keys("What is six times seven?")
    box.send_keys(Keys.ENTER)
    # while streaming: the Send button turns into Stop and the reply grows under a cursor
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .body"))
    wait_for(driver, lambda d: d.find_element(By.ID, "send").text == "Send")
    reply = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    assert reply.find_element(By.CSS_SELECTOR, ".tool .code").text.endswith("6*7")
    assert reply.find_element(By.CSS_SELECTOR, ".tool .out").text.endswith("42")
    assert reply.find_element(By.CSS_SELECTOR, ".md").text == "Yes 42"
    assert driver.find_element(By.CSS_SELECTOR, ".msg.user .body").text == "What is six times seven?"

    driver.refresh()  # kept in localStorage
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .tool"))
    assert driver.find_element(By.CSS_SELECTOR, ".chat.on span").text == "What is six times seven?"

    driver.execute_script("[...document.querySelectorAll('.msg.assistant .tools button')]"
                          ".find(b => b.textContent === 'regenerate').click()")
    wait_for(driver, lambda d: d.find_element(By.ID, "send").text == "Send"
             and d.find_elements(By.CSS_SELECTOR, ".msg.assistant .md"))
    assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1

    driver.execute_script("[...document.querySelectorAll('.msg.user .tools button')]"
                          ".find(b => b.textContent === 'edit').click()")
    edit = driver.find_element(By.CSS_SELECTOR, ".msg.user textarea")
    edit.clear()
    edit.send_keys("And 6*7 again?")
    driver.execute_script("[...document.querySelectorAll('.msg.user .tools button')]"
                          ".find(b => b.textContent === 'save & send').click()")
    wait_for(driver, lambda d: d.find_element(By.ID, "send").text == "Send"
             and d.find_elements(By.CSS_SELECTOR, ".msg.assistant .md"))
    assert [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.user .body")] == ["And 6*7 again?"]
    stored = driver.execute_script("return JSON.parse(localStorage.getItem('nanochat.chats'))[0].messages")
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert {"type": "python", "text": "6*7"} in stored[1]["content"]

    # long random replies (temperature 2, no top-k): seen growing while they stream, then stopped with Stop.
    # A random reply may end by itself before that is seen, so up to 4 tries.
    for field, value in (("temperature", "2"), ("top_k", "0"), ("max_tokens", "2000")):
        driver.find_element(By.ID, field).clear()
        driver.find_element(By.ID, field).send_keys(value)

    def state(d):  # (streaming?, length of the last reply's text)
        return d.execute_script("const m = document.querySelectorAll('.msg.assistant .body');"
                                "return [document.getElementById('send').textContent === 'Stop',"
                                " m.length ? m[m.length - 1].textContent.length : 0]")
    def state_once(d, ready):
        st = state(d)
        return st if ready(st) else None
    for attempt in range(4):
        box = driver.find_element(By.ID, "input")
        box.send_keys(f"Tell me a long story {attempt}")
        box.send_keys(Keys.ENTER)
        streaming, first = wait_for(driver, lambda d: state_once(d, lambda st: not st[0] or st[1] > 0))
        if streaming:
            grown = wait_for(driver, lambda d: d.execute_script(  # seen and stopped in one go: no race
                "const m = document.querySelectorAll('.msg.assistant .body'), b = document.getElementById('send');"
                "if (b.textContent !== 'Stop') return 'ended';"
                f"if (m[m.length - 1].textContent.length > {first}) {{ b.click(); return 'grew'; }}"
                "return null;"))
            if grown == "grew":
                break  # the text grew while the reply was still streaming, and Stop was pressed
        wait_for(driver, lambda d: d.find_element(By.ID, "send").text == "Send")
    else:
        pytest.fail("no reply was seen growing while it streamed")
    wait_for(driver, lambda d: d.find_element(By.ID, "send").text == "Send")
    assert "(stopped)" in driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text

    driver.find_element(By.ID, "new").click()
    assert not driver.find_elements(By.CSS_SELECTOR, ".msg")
