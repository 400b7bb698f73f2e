"""A stand-in for the paid LLM judge: an OpenAI-compatible chat-completions server on 127.0.0.1.

Replies are scripted per answer text (``script``: answer key -> [(status, content), ...], consumed
in order; the key is found as ``ANSWER<key>`` in the prompt); prompts no script key matches get
``default(prompt)``, or fail the request when there is none.
"""
from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional


def word_overlap_score(prompt: str) -> str:
    """A deterministic grader for pipelines: 10 x the share of the reference's words in the answer."""
    ref = re.search(r"\[Reference answer\]\n(.*?)\n\n\[Assistant's answer\]\n(.*)\Z", prompt, re.S)
    words = lambda t: set(re.findall(r"[a-z]+", t.lower()))  # noqa: E731
    want, got = (words(ref.group(1)), words(ref.group(2))) if ref else (set(), set())
    return f"Score: {round(10 * len(want & got) / max(1, len(want)))}\nword overlap with the reference"


class JudgeServer:
    def __init__(self, default: Optional[Callable[[str], str]] = None):
        self.script: dict[str, list[tuple[int, str]]] = {}
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                with outer.lock:
                    outer.requests.append(body)
                    outer.headers.append(dict(self.headers))
                    key = next((k for k in outer.script if f"ANSWER<{k}>" in prompt), None)
                    if key is not None:
                        status, content = outer.script[key].pop(0)
                    elif default is not None:
                        status, content = 200, default(prompt)
                    else:
                        status, content = 404, ""
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload.encode() if status == 200 else b'{"error": "boom"}')

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
