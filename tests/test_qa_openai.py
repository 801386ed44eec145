"""The openai backend against a small OpenAI-compatible HTTP server started on 127.0.0.1 by the test."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from qa_extraction.backends import BackendConfigError
from qa_extraction.backends.openai_api import BackendUnavailableError, OpenAIBackend
from qa_extraction.extract import main as extract_main
from qa_extraction.io import read_extractions, read_reports
from qa_extraction.llm import Item
from vlsurv.prompts import load_questions

REPO = Path(__file__).resolve().parents[1]
REPORTS = Path(__file__).parent / "fixtures" / "qa" / "reports.csv"
KEY = "sk-test-secret-123"
VALID = json.dumps({"status": "absent", "answer": "No pleural effusion."})


class FakeServer(ThreadingHTTPServer):
    """Answers /v1/chat/completions with ``plan(call_number, body) -> (http_status, content, delay_s)``."""

    daemon_threads = True

    def __init__(self, plan):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.plan, self.calls, self.lock = plan, [], threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.stopper = threading.Timer(60.0, self.shutdown)  # the server stops by itself at the latest then
        self.stopper.daemon = True

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def handle_error(self, request, client_address):  # a client that timed out and left is expected
        pass

    def __enter__(self):
        self.thread.start()
        self.stopper.start()
        return self

    def __exit__(self, *exc):
        self.stopper.cancel()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            number = len(self.server.calls)
            self.server.calls.append(
                {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
            )
        status, content, delay = self.server.plan(number, body)
        time.sleep(delay)
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def backend(url: str, **kw) -> OpenAIBackend:
    options = dict(
        base_url=url,
        api_key=KEY,
        model="served-model",
        timeout=2.0,
        max_retries=2,
        backoff=0.01,
        concurrency=2,
        batch_size=4,
    )
    return OpenAIBackend(**{**options, **kw})


def items(n_reports: int = 1, question_ids=("pleura",)) -> list[Item]:
    questions = [q for q in load_questions("lung") if q.id in question_ids]
    return [
        Item(r, q) for r in read_reports(REPORTS, "report_id", ["findings"])[:n_reports] for q in questions
    ]


def test_valid_answers_with_key_header_and_nothing_secret_in_logs(caplog):
    with FakeServer(lambda n, body: (200, VALID, 0.0)) as server, caplog.at_level(logging.DEBUG):
        results = list(backend(server.base_url).run(items(2, ("pleura", "tumor"))))
    assert [r.status for _, r in results] == ["absent"] * 4
    call = server.calls[0]
    assert call["path"] == "/v1/chat/completions" and call["auth"] == f"Bearer {KEY}"
    assert call["body"]["model"] == "served-model" and call["body"]["temperature"] == 0.0
    assert [m["role"] for m in call["body"]["messages"]] == ["system", "user"]
    assert KEY not in caplog.text and KEY not in repr(backend(server.base_url))


def test_slow_reply_times_out_then_the_retry_succeeds(caplog):
    plan = lambda n, body: (200, VALID, 1.0 if n == 0 else 0.0)  # noqa: E731
    with FakeServer(plan) as server, caplog.at_level(logging.WARNING, logger="qa_extraction"):
        results = list(backend(server.base_url, timeout=0.3).run(items()))
    assert results[0][1].status == "absent" and len(server.calls) == 2
    assert "no reply from" in caplog.text and "retry 1/2" in caplog.text and KEY not in caplog.text


def test_a_500_then_success():
    with FakeServer(lambda n, body: (500, "", 0.0) if n == 0 else (200, VALID, 0.0)) as server:
        results = list(backend(server.base_url).run(items()))
    assert results[0][1].answer == "No pleural effusion." and len(server.calls) == 2


def test_malformed_json_gets_one_repair_prompt_then_an_error_row():
    with FakeServer(lambda n, body: (200, '{"status": "present", "answer": ', 0.0)) as server:
        ((_, result),) = list(backend(server.base_url).run(items()))
    assert result.status == "error" and result.answer == ""
    assert (
        result.extra["raw"] == '{"status": "present", "answer": ' and "invalid JSON" in result.extra["error"]
    )
    assert len(server.calls) == 2
    repair = server.calls[1]["body"]["messages"]
    assert [m["role"] for m in repair] == ["system", "user", "assistant", "user"]
    assert "could not be used: invalid JSON" in repair[-1]["content"]


def test_a_repaired_reply_is_kept():
    plan = lambda n, body: (200, "Sure! The answer is present." if n == 0 else VALID, 0.0)  # noqa: E731
    with FakeServer(plan) as server:
        ((_, result),) = list(backend(server.base_url).run(items()))
    assert result.status == "absent" and result.extra == {"repaired": True}


def test_unreachable_server_is_a_clear_error_without_the_key():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(
        BackendUnavailableError, match=rf"cannot reach {url}/chat/completions .* after 3 attempts"
    ) as info:
        list(backend(url).run(items()))
    assert KEY not in str(info.value)


def test_a_401_stops_at_once():
    with FakeServer(lambda n, body: (401, "", 0.0)) as server:
        with pytest.raises(
            BackendUnavailableError, match=r"HTTP 401 .*check --base-url, --model and the API key"
        ):
            list(backend(server.base_url).run(items()))
    assert len(server.calls) == 1


def test_extract_killed_mid_run_then_resumed_has_every_pair_once(tmp_path, monkeypatch):
    out = tmp_path / "x.jsonl"
    plan = lambda n, body: (200, VALID, 0.03)  # noqa: E731
    flags = [
        "--reports",
        str(REPORTS),
        "--id-column",
        "report_id",
        "--text-column",
        "findings",
        "--backend",
        "openai",
        "--model",
        "m",
        "--concurrency",
        "1",
        "--batch-size",
        "1",
        "--out",
        str(out),
    ]
    with FakeServer(plan) as server:
        monkeypatch.setenv("VLSURV_OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        env = dict(os.environ)
        process = subprocess.Popen(
            [sys.executable, "-m", "qa_extraction", "extract", *flags],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 5):
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate(timeout=10)
        written = out.read_text().count("\n")
        assert 5 <= written < 24, stderr.decode()[-2000:]
        with open(out, "ab") as handle:  # the kill could also land inside a write: a torn last line
            handle.write(b'{"report_id": "r4", "question_id": "bo')
        extract_main(flags)
    rows = read_extractions(out)
    pairs = [(r["report_id"], r["question_id"]) for r in rows]
    assert len(pairs) == len(set(pairs)) == 24
    assert KEY not in stderr.decode()


def test_missing_model_flag_is_a_clear_error(tmp_path):
    with pytest.raises(BackendConfigError, match=r"--backend openai needs --model"):
        extract_main(
            [
                "--reports",
                str(REPORTS),
                "--id-column",
                "report_id",
                "--text-column",
                "findings",
                "--backend",
                "openai",
                "--out",
                str(tmp_path / "x.jsonl"),
            ]
        )


def test_vocab_prompt_answered_by_the_openai_backend(tmp_path):
    from qa_extraction.vocab import main as vocab_main

    draft = "tumor: Where is the mass?\npleura: Is there a pleural effusion?"
    with FakeServer(lambda n, body: (200, draft, 0.0)) as server:
        vocab_main(
            [
                "--reports",
                str(REPORTS),
                "--text-column",
                "findings",
                "--top",
                "10",
                "--out",
                str(tmp_path / "words.csv"),
                "--backend",
                "openai",
                "--model",
                "m",
                "--base-url",
                server.base_url,
            ]
        )
    assert (tmp_path / "words.csv.questions.txt").read_text() == draft + "\n"
    assert "medical words" in server.calls[0]["body"]["messages"][0]["content"]
