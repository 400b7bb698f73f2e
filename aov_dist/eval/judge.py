"""GPT-Score: an LLM judge behind any OpenAI-compatible chat-completions endpoint.

The judge sees question, reference answer and model answer (the prompt template is
aov_dist/eval/prompts/gpt_score.txt, documented in docs/evaluation.md) and must reply with a line
"Score: <0..10>". Per answer the outcome is one of
  * ok        - a score was parsed;
  * malformed - the endpoint answered but no score in 0..10 could be read (counted, not fatal);
  * error     - the request failed after all retries (counted, not fatal).
Transient failures (connection errors, timeouts, HTTP 408/409/429/5xx) are retried by the HTTP
client itself (urllib3's ``Retry`` on the requests session: exponential backoff, a server's
Retry-After honoured); other HTTP errors (401, 404, ...) are not retried.
GPT-Score = mean of the ok scores on the 0-10 scale.
"""
from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from aov_dist.eval.config import JudgeConfig

log = logging.getLogger(__name__)

DEFAULT_PROMPT = Path(__file__).with_name("prompts") / "gpt_score.txt"
_SCORE = re.compile(r"score\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_BARE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*$")
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_SCORE = 10.0


@dataclass(frozen=True)
class JudgeResult:
    score: Optional[float]
    status: str  # ok | malformed | error
    raw: str = ""


def parse_score(text: str) -> Optional[float]:
    """The 0..10 score in a judge reply ("Score: 7", "score = 7.5", or a bare "7"/"7/10"); else None."""
    m = _SCORE.search(text) or _BARE.match(text)
    if not m:
        return None
    value = float(m.group(1))
    return value if 0.0 <= value <= MAX_SCORE else None


def retrying_session(retries: int, backoff_s: float, status: Sequence[int] = tuple(_RETRY_STATUS)) -> requests.Session:
    """A requests session whose POSTs urllib3 retries: connection errors, read timeouts and the
    ``status`` codes, ``retries`` times: the first retry at once, then after backoff_s x 2, x 4, ..."""
    retry = Retry(total=retries, connect=retries, read=retries, status=retries, other=0,
                  status_forcelist=status, allowed_methods=frozenset({"POST"}), backoff_factor=backoff_s,
                  raise_on_status=False, respect_retry_after_header=True)
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class JudgeClient:
    def __init__(self, cfg: JudgeConfig):
        if not cfg.base_url:
            raise ValueError("eval.judge.base_url is not set: no judge endpoint configured")
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.template = Path(cfg.prompt_file or DEFAULT_PROMPT).read_text(encoding="utf-8")
        for key in ("{question}", "{reference}", "{answer}"):
            if key not in self.template:
                raise ValueError(f"judge prompt {cfg.prompt_file or DEFAULT_PROMPT} lacks the field {key}")
        self._session = retrying_session(cfg.max_retries, cfg.backoff_s)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def prompt(self, question: str, reference: str, answer: str) -> str:
        # str.replace, not str.format: answers may contain braces
        return (self.template.replace("{question}", question)
                .replace("{reference}", reference).replace("{answer}", answer))

    def score_one(self, question: str, reference: str, answer: str) -> JudgeResult:
        body = {"model": self.cfg.model, "temperature": 0, "max_tokens": self.cfg.max_tokens,
                "messages": [{"role": "user", "content": self.prompt(question, reference, answer)}]}
        try:  # the session retries transient failures (retrying_session)
            r = self._session.post(self.url, json=body, headers=self._headers(), timeout=self.cfg.timeout_s)
            r.raise_for_status()
            text = r.json()["choices"][0]["message"]["content"] or ""
        except (requests.RequestException, KeyError, IndexError, TypeError, ValueError) as e:
            # retries exhausted, a non-retryable HTTP status, or an answer that is not a chat completion
            return JudgeResult(None, "error", f"{type(e).__name__}: {e}")
        score = parse_score(text)
        return JudgeResult(score, "ok" if score is not None else "malformed", text)

    def score_many(self, questions: Sequence[str], references: Sequence[str],
                   answers: Sequence[str]) -> list[JudgeResult]:
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            return list(pool.map(self.score_one, questions, references, answers))


def gpt_scores(cfg: JudgeConfig, questions: Sequence[str], references: Sequence[str],
               answers: Sequence[str]) -> Optional[list[JudgeResult]]:
    """Judge every answer; None (with a logged message) when no endpoint is configured."""
    if not cfg.base_url:
        log.warning("GPT-Score skipped: no judge endpoint configured (set eval.judge.base_url "
                    "to an OpenAI-compatible /v1 URL and the key in $%s)", cfg.api_key_env)
        return None
    return JudgeClient(cfg).score_many(questions, references, answers)


def summarize(results: Sequence[JudgeResult]) -> dict[str, Optional[float]]:
    ok = [r.score for r in results if r.status == "ok"]
    return {"gpt_score": (sum(ok) / len(ok)) if ok else None, "judged": len(ok),
            "malformed": sum(r.status == "malformed" for r in results),
            "errors": sum(r.status == "error" for r in results)}
