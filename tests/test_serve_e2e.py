"""`dbrx serve` end to end: the real engine behind the real server, driven by the official `openai` client.

Greedy answers equal a recompute-everything greedy reference (conftest.reference_greedy), also for 32 concurrent
streaming clients with mixed sampling settings; prompt log-probabilities (what lm-evaluation-harness scores)
equal a direct log-softmax of the model's logits; the chat page is served."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402
from conftest import SERVED_NAME as NAME  # noqa: E402  (the `served` fixture is conftest's)
from conftest import reference_greedy  # noqa: E402

from dbrx.tokenizer import get_tokenizer  # noqa: E402
from dbrx.tokens import UNUSED_IDS  # noqa: E402


def _client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def test_completion_equals_the_reference(served):
    model, url, _ = served
    tok = get_tokenizer()
    out = _client(url).completions.create(model=NAME, prompt="To be, or not", max_tokens=8, temperature=0)
    ids = tok.encode("To be, or not")
    expected = reference_greedy(model, ids, 8)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(expected)
    if out.choices[0].finish_reason == "length":  # (a stop id inside the 8 tokens would end it earlier)
        assert out.choices[0].text == tok.decode(expected)


def test_32_concurrent_streams_with_mixed_sampling(served):
    model, url, front = served
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 100_000, (int(n),), generator=g).tolist()
               for n in torch.randint(4, 60, (32,), generator=g)]

    def stream(i):
        greedy = i % 2 == 0
        chunks = _client(url).completions.create(
            model=NAME, prompt=prompts[i], max_tokens=10, stream=True, temperature=0 if greedy else 1.0,
            top_p=1.0 if greedy else 0.9, seed=i, logprobs=1, extra_body={"top_k": 0 if greedy else 40})
        ids = [t for c in chunks for t in (c.choices[0].logprobs.tokens if c.choices and c.choices[0].logprobs
                                             else [])]
        return greedy, ids

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(stream, range(32)))
    tok = get_tokenizer()
    for i, (greedy, pieces) in enumerate(results):
        if greedy:
            expected = reference_greedy(model, prompts[i], 10)
            assert "".join(pieces) == tok.decode(expected), i
    stats = front.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_usage"] == 0.0


def test_prompt_logprobs_equal_a_direct_log_softmax(served):
    """lm-evaluation-harness's `local-completions` log-likelihood request: echo, max_tokens 0, logprobs 1."""
    model, url, _ = served
    tok = get_tokenizer()
    text = "The quick brown fox jumps over the lazy dog"
    out = _client(url).completions.create(model=NAME, prompt=text, max_tokens=0, echo=True, logprobs=1,
                                          temperature=0)
    lp = out.choices[0].logprobs
    ids = tok.encode(text)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :, :100280].double()  # (T, V): the real ids only ...
        logits[:, list(UNUSED_IDS)] = -math.inf  # ... that are tokens (the gaps of cl100k cannot be decoded)
        ref = torch.log_softmax(logits, -1)
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    for t in range(1, len(ids)):
        assert math.isclose(lp.token_logprobs[t], float(ref[t - 1, ids[t]]), abs_tol=1e-4), t
    assert out.choices[0].text == text


def test_chat_stream_and_the_chat_page(served):
    _, url, _ = served
    chunks = _client(url).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, stream=True, temperature=0)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(text, str)
    page = httpx.get(f"{url}/", timeout=10)
    assert page.status_code == 200 and "/v1/chat/completions" in page.text and "<textarea" in page.text


def test_the_chat_page_streams_an_answer_in_a_real_browser(served):
    """Headless Chromium (Debian's, driven by Selenium) types a message; the streamed answer appears."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, url, _ = served
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get(f"{url}/")
        picker = driver.find_element(By.ID, "model")  # filled from /v1/models: here the base model alone
        WebDriverWait(driver, 30).until(lambda d: picker.find_elements(By.TAG_NAME, "option"))
        assert [o.get_attribute("value") for o in picker.find_elements(By.TAG_NAME, "option")] == [NAME]
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("12")
        driver.find_element(By.ID, "input").send_keys("Hello there")
        driver.find_element(By.ID, "send").click()
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.user"))
        assert driver.find_element(By.CSS_SELECTOR, ".msg.user").text == "Hello there"
        # the answer bubble fills as chunks arrive, and the send button comes back when the stream has ended
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled()
                   and d.find_element(By.CSS_SELECTOR, ".msg.assistant, .msg.error").text)
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error"), driver.find_element(
            By.CSS_SELECTOR, ".msg.error").text
        assert driver.find_element(By.CSS_SELECTOR, ".msg.assistant").text.strip()
    finally:
        driver.quit()
