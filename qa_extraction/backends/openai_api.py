"""The ``openai`` backend: any OpenAI-compatible ``POST {base_url}/chat/completions`` (vLLM, TGI, ...).

Standard library only (urllib + a thread pool). ``concurrency`` requests are in flight at once; each
has a ``timeout``; a timeout, a refused connection, a 429 or a 5xx is retried up to ``max_retries``
times with exponential backoff (``backoff``, 2x, 4x ... seconds). A server that stays unreachable or
answers 4xx stops the run with ``BackendUnavailableError`` (rows written so far are kept; a rerun
resumes). The API key goes into the Authorization header only; it is never logged or put in an error.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from qa_extraction.backends import BackendConfigError
from qa_extraction.llm import ExtractionPrompts, Item, Messages, Result, answer_items
from vlsurv.errors import InputError

log = logging.getLogger("qa_extraction")
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class BackendUnavailableError(InputError):
    """The server cannot be reached or refuses the requests."""


class OpenAIBackend:
    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        model: str,
        batch_size: int = 32,
        max_tokens: int = 160,
        concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 3,
        backoff: float = 1.0,
    ):
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise BackendConfigError(
                "openai backend: --concurrency >= 1, --max-retries >= 0 and --timeout > 0 expected"
            )
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self.model = model
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.concurrency, self.timeout = concurrency, timeout
        self.max_retries, self.backoff = max_retries, backoff
        self.prompts = ExtractionPrompts.load()

    def __repr__(self) -> str:  # the key stays out of reprs and tracebacks
        return f"OpenAIBackend(url={self.url!r}, model={self.model!r})"

    def _request(self, messages: Messages) -> urllib.request.Request:
        body = {"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": self.max_tokens}
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return urllib.request.Request(
            self.url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST"
        )

    def complete(self, messages: Messages) -> str:
        """The reply text of one chat completion, with retries."""
        problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1)
                log.warning(
                    "openai backend: %s; retry %d/%d in %.1fs", problem, attempt, self.max_retries, delay
                )
                time.sleep(delay)
            try:
                with urllib.request.urlopen(self._request(messages), timeout=self.timeout) as response:
                    payload = response.read()
            except urllib.error.HTTPError as err:
                problem = f"HTTP {err.code} from {self.url}"
                if err.code in _RETRY_STATUS:
                    continue
                raise BackendUnavailableError(
                    f"openai backend: {problem} ({err.reason}); check --base-url, --model and the API key"
                ) from None
            except TimeoutError:
                problem = f"no reply from {self.url} within {self.timeout:g}s"
                continue
            except (urllib.error.URLError, ConnectionError) as err:
                reason = getattr(err, "reason", err)
                problem = f"cannot reach {self.url} ({reason})"
                continue
            try:
                return str(json.loads(payload)["choices"][0]["message"]["content"] or "")
            except (ValueError, KeyError, IndexError, TypeError):
                problem = f"{self.url} sent a reply that is not a chat completion"
        raise BackendUnavailableError(
            f"openai backend: {problem} after {self.max_retries + 1} attempts; check "
            "--base-url (or VLSURV_OPENAI_BASE_URL) and that the server is up"
        )

    def generate(self, conversations: list[Messages]) -> list[str]:
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            return list(pool.map(self.complete, conversations))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def run(self, items: Sequence[Item]) -> Iterator[tuple[Item, Result]]:
        log.info("openai backend: %d items to %s, %d in flight", len(items), self.url, self.concurrency)
        return answer_items(self.generate, items, self.batch_size, self.prompts)
