"""The Gradio chat page in a real headless browser (Chromium + chromedriver from Debian, driven by selenium):
load the page, send a message, watch the reply stream in, keep a screenshot in the test's tmp folder."""
import os
import shutil
import time

import pytest

from fixtures_inference import SlowEngine, free_port, make_model_folder, wait_until
from inference.chat import Chat
from inference.engine import SamplingParams
from inference.templates import load_chat_template

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e .[test])")
pytest.importorskip("gradio")


def visible(text: str) -> str:
    """What survives HTML/markdown rendering for sure: letters and digits."""
    return "".join(c for c in text if c.isalnum())


@pytest.mark.slow  # ~20-30 s: Chromium and Gradio start-up
def test_web_page_streams_a_reply(tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from inference.web import build_demo

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    _, chat_dir, model, tok = make_model_folder(tmp_path / "model")
    engine = SlowEngine(model, tok, slots=2, step_delay=0.03).start()
    chat = Chat(engine, load_chat_template(chat_dir, tok))
    demo = build_demo(chat, SamplingParams(temperature=0.0, max_tokens=40, repetition_penalty=1.0))
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False,
                        quiet=True)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1000,900"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    try:
        driver.get(f"http://127.0.0.1:{port}")
        deadline = time.time() + 60
        while not driver.find_elements(By.CSS_SELECTOR, "textarea"):
            assert time.time() < deadline, "the chat page did not load"
            time.sleep(0.1)
        box = driver.find_element(By.CSS_SELECTOR, "textarea")
        box.send_keys("Hello there")
        box.send_keys(Keys.ENTER)
        seen = []  # the bot message's text each time it changed
        deadline = time.time() + 60
        while time.time() < deadline and not (engine.requests and engine.requests[0].done and len(seen) > 1
                                              and visible(seen[-1]) == visible(engine.requests[0].text)):
            bots = driver.find_elements(By.CSS_SELECTOR, '[data-testid="bot"]')
            if bots and bots[-1].text and (not seen or bots[-1].text != seen[-1]):
                seen.append(bots[-1].text)
            time.sleep(0.05)
        driver.save_screenshot(str(tmp_path / "web_chat.png"))
        print("screenshot:", tmp_path / "web_chat.png")
        (req,) = engine.requests
        assert req.finish_reason in ("stop", "length")
        # Streamed: the page showed the reply growing, each state a prefix of the next, ending in the full reply.
        states = [visible(s) for s in seen]
        assert len(set(states)) >= 3, seen
        assert all(b.startswith(a) for a, b in zip(states, states[1:]))
        assert states[-1] == visible(req.text) == visible(chat.chat([{"role": "user", "content": "Hello there"}],
                                                                    temperature=0.0, max_tokens=40))
        assert os.path.getsize(tmp_path / "web_chat.png") > 1000
        # A second message: the page sends the history with it, so the prompt holds both turns.
        box = driver.find_element(By.CSS_SELECTOR, "textarea")
        box.send_keys("again")
        box.send_keys(Keys.ENTER)
        assert wait_until(lambda: len(engine.requests) == 3 and engine.requests[2].done, timeout=60)
        history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": req.text.strip()},
                   {"role": "user", "content": "again"}]
        decode = chat.template.tokenizer.decode  # (Gradio turns the random reply's tabs into spaces)
        assert visible(decode(engine.requests[2].prompt_ids)) == visible(decode(chat.template.encode(history)))
        assert engine.requests[2].prompt_ids.count(tok.eos_id) == 1  # the first turn was closed
        driver.save_screenshot(str(tmp_path / "web_chat_2.png"))
    finally:
        driver.quit()
        demo.close()
        chat.close()
