"""The Gradio chat page: its start-up output and port check, and in a real headless browser (Chromium +
chromedriver from Debian, driven by selenium) loading the page, sending a message, watching the reply stream in,
keeping a screenshot in the test's tmp folder. Without Chromium the browser test skips; this module itself imports
without it, selenium or gradio (tests/test_common.py imports every test module)."""
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from fixtures_inference import SlowEngine, free_port, make_model_folder, wait_until
from fixtures_time import limit
from fixtures_train import REPO, env
from inference.chat import Chat
from inference.engine import SamplingParams
from inference.templates import load_chat_template


def browser_paths() -> tuple[str | None, str | None]:
    """Chromium and chromedriver: $LLAMA_CHROMIUM / $LLAMA_CHROMEDRIVER when set (empty: none), else on PATH."""
    def find(var: str, *names: str) -> str | None:
        if var in os.environ:
            return os.environ[var] or None
        return next(filter(None, map(shutil.which, names)), None)

    return find("LLAMA_CHROMIUM", "chromium", "chromium-browser"), find("LLAMA_CHROMEDRIVER", "chromedriver")


def visible(text: str) -> str:
    """What survives HTML/markdown rendering for sure: letters and digits."""
    return "".join(c for c in text if c.isalnum())


@pytest.mark.slow  # ~20-30 s: Chromium and Gradio start-up
def test_web_page_streams_a_reply(tmp_path, monkeypatch):
    chromium, chromedriver = browser_paths()
    if not (chromium and chromedriver):
        pytest.skip("needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e .[test])")
    pytest.importorskip("gradio")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from inference.web import build_demo, launch

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    _, chat_dir, model, tok = make_model_folder(tmp_path / "model")
    engine = SlowEngine(model, tok, slots=2, step_delay=0.03).start()
    chat = Chat(engine, load_chat_template(chat_dir, tok))
    demo = build_demo(chat, SamplingParams(temperature=0.0, max_tokens=40, repetition_penalty=1.0))
    port = free_port()
    launch(demo, "127.0.0.1", port, slots=2, block=False)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1000,900"):
        options.add_argument(arg)
    options.binary_location = chromium
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(chromedriver))
    try:
        driver.get(f"http://127.0.0.1:{port}")
        deadline = time.time() + limit(60)
        while not driver.find_elements(By.CSS_SELECTOR, "textarea"):
            assert time.time() < deadline, "the chat page did not load"
            time.sleep(0.1)
        box = driver.find_element(By.CSS_SELECTOR, "textarea")
        box.send_keys("Hello there")
        box.send_keys(Keys.ENTER)
        seen = []  # the bot message's text each time it changed
        deadline = time.time() + limit(60)
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
        assert wait_until(lambda: len(engine.requests) == 3 and engine.requests[2].done, timeout=limit(60))
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


def test_page_prints_its_address_and_no_share_hint(tmp_path, monkeypatch, capfd):
    """The page is local-only and never uses Gradio's share links, so Gradio's "set `share=True`" hint is not
    printed; its address is."""
    pytest.importorskip("gradio")
    import httpx

    from inference.web import build_demo, launch

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    _, chat_dir, model, tok = make_model_folder(tmp_path / "model")
    engine = SlowEngine(model, tok, slots=1, step_delay=0.0).start()
    chat = Chat(engine, load_chat_template(chat_dir, tok))
    demo = build_demo(chat, SamplingParams(temperature=0.0, max_tokens=8))
    port = free_port()
    try:
        url = launch(demo, "127.0.0.1", port, slots=1, block=False)
        assert url == f"http://127.0.0.1:{port}" and httpx.get(url, timeout=limit(30)).status_code == 200
    finally:
        demo.close()
        chat.close()
    out = capfd.readouterr()
    assert f"http://127.0.0.1:{port}" in out.out
    assert "share" not in (out.out + out.err).lower(), out


def test_taken_port_is_one_line_before_the_model_loads(tmp_path):
    """--model names no folder: the port error comes first, so nothing was loaded."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "inference.web", "--model", str(tmp_path / "absent"),
                                 "--port", str(port)], capture_output=True, text=True, cwd=REPO, env=env(),
                                timeout=limit(120))
    assert result.returncode == 1 and result.stderr.splitlines() == [
        f"error: port {port} on 127.0.0.1 is in use (another server?); pass a free one with --port PORT"], \
        result.stderr
