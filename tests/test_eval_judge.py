"""The GPT-Score judge against a local OpenAI-compatible server on 127.0.0.1."""
import pytest

from aov_dist.eval.config import JudgeConfig
from aov_dist.eval.judge import JudgeClient, gpt_scores, parse_score, summarize
from judge_server import JudgeServer


@pytest.fixture
def server():
    s = JudgeServer()
    yield s
    s.close()


def _cfg(url, **kw):
    return JudgeConfig(base_url=url, model="judge-test", max_retries=2, backoff_s=0.0, timeout_s=5, **kw)


def test_parse_score_forms():
    assert parse_score("Score: 7\nGood answer.") == 7.0
    assert parse_score("**Score:** 8.5 because") == 8.5
    assert parse_score("score = 3") == 3.0
    assert parse_score(" 9/10 ") == 9.0
    assert parse_score("Score: 11") is None  # out of range
    assert parse_score("I would rate it highly.") is None


def test_scores_retries_and_malformed(server, monkeypatch):
    monkeypatch.setenv("AOV_JUDGE_API_KEY", "sk-test-123")
    server.script = {
        "a": [(200, "Score: 8\nMatches the reference.")],
        "b": [(500, ""), (200, "Score: 4\nPartly.")],  # one 500, then success
        "c": [(200, "It is quite good.")],  # no score: malformed, counted
        "d": [(503, ""), (503, ""), (503, "")],  # exhausted retries: error, counted
    }
    client = JudgeClient(_cfg(server.url, concurrency=1))
    res = client.score_many(["q"] * 4, ["ref"] * 4, ["ANSWER<a>", "ANSWER<b>", "ANSWER<c>", "ANSWER<d>"])
    assert [r.status for r in res] == ["ok", "ok", "malformed", "error"]
    assert [r.score for r in res] == [8.0, 4.0, None, None]
    assert summarize(res) == {"gpt_score": 6.0, "judged": 2, "malformed": 1, "errors": 1}
    # b retried once; d tried 1 + max_retries times, then counted as an error naming the status
    assert len(server.requests) == 1 + 2 + 1 + 3
    assert "503" in res[3].raw
    assert server.requests[0]["model"] == "judge-test" and server.requests[0]["temperature"] == 0
    assert server.headers[0]["Authorization"] == "Bearer sk-test-123"
    prompt = server.requests[0]["messages"][0]["content"]
    assert "[Reference answer]\nref" in prompt and "Score: <integer>" in prompt


def test_braces_in_answers_do_not_break_the_template(server):
    server.script = {"x": [(200, "Score: 10")]}
    res = JudgeClient(_cfg(server.url)).score_many(["q {0}"], ["r {}"], ["ANSWER<x> {answer}"])
    assert res[0].score == 10.0
    assert "q {0}" in server.requests[0]["messages"][0]["content"]


def test_non_retryable_http_error_is_counted_not_fatal(server):
    server.script = {"x": [(401, "")]}
    res = JudgeClient(_cfg(server.url)).score_many(["q"], ["r"], ["ANSWER<x>"])
    assert res[0].status == "error" and "401" in res[0].raw
    assert len(server.requests) == 1


def test_unreachable_endpoint_is_an_error_after_retries():
    res = JudgeClient(_cfg("http://127.0.0.1:9/v1", max_tokens=8)).score_many(["q"], ["r"], ["a"])
    assert res[0].status == "error" and "ConnectionError" in res[0].raw


def test_retries_back_off_exponentially_and_honour_retry_after(monkeypatch):
    from aov_dist.eval.judge import retrying_session

    retry = retrying_session(retries=4, backoff_s=0.5).get_adapter("http://x").max_retries
    assert retry.total == 4 and retry.backoff_factor == 0.5 and retry.respect_retry_after_header
    assert set(retry.status_forcelist) == {408, 409, 429, 500, 502, 503, 504}
    from urllib3.exceptions import ConnectTimeoutError

    once = retry.increment("POST", "/v1", error=ConnectTimeoutError())
    twice = once.increment("POST", "/v1", error=ConnectTimeoutError())
    assert (once.get_backoff_time(), twice.get_backoff_time()) == (0.0, 0.5 * 2)  # then x2 per try


def test_skipped_without_endpoint(caplog):
    assert gpt_scores(JudgeConfig(base_url=None), ["q"], ["r"], ["a"]) is None
    assert "GPT-Score skipped" in caplog.text


def test_prompt_file_must_have_the_fields(tmp_path):
    bad = tmp_path / "p.txt"
    bad.write_text("Rate {answer}")
    with pytest.raises(ValueError, match=r"lacks the field \{question\}"):
        JudgeClient(JudgeConfig(base_url="http://127.0.0.1:9/v1", prompt_file=str(bad)))
