"""Small, dependency-free guards for a public deployment (see docs/security.md).

* ``csv_cell``: OWASP's rule against spreadsheet formula injection.
* ``safe_markdown``: model, dataset and rater text rendered without remote resources.
* ``AdminSessions``: the admin login — constant-time password check, a signed, expiring "admin" token as
  the only thing the session keeps, and per-client rate limiting with exponential backoff.

Written here rather than taken from a library: each is a few lines whose exact behaviour the tests pin
down (the OWASP rule, which Markdown/HTML constructs load a remote resource), and the candidates
(defusedcsv, bleach, slowapi) either pull a web framework of their own or sanitise HTML, not Markdown.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time

# ------------------------------------------------------------------------------------------------
# CSV: formula injection
# ------------------------------------------------------------------------------------------------
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value):
    """A value safe to put in a CSV cell a spreadsheet may open.

    OWASP (CSV Injection): a cell that starts with ``= + - @``, a tab or a carriage return is prefixed with a
    single quote so spreadsheets show it as text instead of evaluating it. Numbers are left alone (a
    negative number is data, not a formula); so is everything that does not start with those characters."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


# ------------------------------------------------------------------------------------------------
# Markdown without remote resources
# ------------------------------------------------------------------------------------------------
# ![alt](url "title") and ![alt](<url with spaces>). Possessive quantifiers over character classes that
# exclude the next delimiter: every scan stops at the next '[', '(' or quote, so the work is linear in
# the text however it is shaped (tests/test_security.py measures it).
_MD_IMAGE = re.compile(r"!\[([^\[\]\n]*+)\]\(\s*+(?:<([^<>\n]*+)>|([^()\s<>]*+))"
                       r"(?:\s++(?:\"[^\"\n]*+\"|'[^'\n]*+'))?\s*+\)")
# reference-style image: ![alt][ref]
_MD_IMAGE_REF = re.compile(r"!\[([^\[\]\n]*+)\]\[([^\[\]\n]*+)\]")
# raw HTML that fetches something when rendered, or any tag with a style attribute (url(...) in CSS)
_HTML_FETCHING = re.compile(r"<\s*+/?\s*+(?:(?:img|iframe|frame|object|embed|video|audio|source|picture|link|script|"
                            r"style|svg|image|input|form|base|meta|track|math)\b|[a-z][a-z0-9-]*+(?=[^<>]*?\bstyle\s*=))",
                            re.IGNORECASE)


def safe_markdown(text: str | None) -> str:
    """``text`` with every image turned into a plain link and every resource-loading HTML tag escaped.

    Markdown images (inline and reference style) become ``[image: alt](url)`` links: the reader can still
    follow them, but nothing is fetched when the text is shown (a remote image would leak the viewer's IP
    address to whichever host a model output or a dataset row names). HTML tags that load or run
    something (img, iframe, script, video, …) are escaped so they show as text."""
    if not text:
        return text or ""

    def as_link(m):
        url = m.group(2) if m.group(2) is not None else m.group(3)
        alt = m.group(1) or "untitled"
        return f"[image: {alt}](<{url}>)" if url else f"[image: {alt}]"

    text = _MD_IMAGE.sub(as_link, text)
    text = _MD_IMAGE_REF.sub(lambda m: f"[image: {m.group(1) or 'untitled'}][{m.group(2)}]", text)
    # whatever image syntax is left (nested brackets or parentheses the patterns above do not parse) is
    # escaped, so no renderer can read an image out of it: "![" never survives
    text = text.replace("![", "!\\[")
    return _HTML_FETCHING.sub(lambda m: m.group(0).replace("<", "&lt;"), text)


# ------------------------------------------------------------------------------------------------
# Admin login
# ------------------------------------------------------------------------------------------------
class AdminSessions:
    """Password check, signed admin tokens and per-client backoff for one app process.

    * The password is compared with ``hmac.compare_digest`` on SHA-256 digests (constant time whatever
      the lengths).
    * A successful login returns a token ``admin.<expiry>.<nonce>.<mac>``: an HMAC under a key made at
      start-up, so it cannot be forged, does not contain the password, and stops working at expiry or
      when the app restarts. The UI keeps only this token in the session state.
    * After ``free_attempts`` wrong passwords from one client, each further attempt must wait
      ``base_delay_s * 2**(n - free_attempts)`` seconds (at most ``max_delay_s``) after the previous
      one; an attempt made earlier is refused without checking the password, so guessing is slow even
      with the right password in the list. A successful login clears the client's count.
    """

    def __init__(self, password: str, ttl_s: float = 12 * 3600, free_attempts: int = 5,
                 base_delay_s: float = 1.0, max_delay_s: float = 300.0, clock=time.monotonic,
                 wall=time.time):
        self._digest = hashlib.sha256(password.encode()).digest() if password else None
        self._key = secrets.token_bytes(32)
        self.ttl_s, self.free_attempts = ttl_s, free_attempts
        self.base_delay_s, self.max_delay_s = base_delay_s, max_delay_s
        self._clock, self._wall = clock, wall
        self._fails: dict[str, tuple[int, float]] = {}  # client -> (failures, time of the last attempt)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._digest is not None

    def wait_s(self, client: str) -> float:
        """Seconds ``client`` must still wait before its next attempt is checked (0: it may try now)."""
        with self._lock:
            n, last = self._fails.get(client, (0, 0.0))
        if n < self.free_attempts:
            return 0.0
        delay = min(self.max_delay_s, self.base_delay_s * 2 ** (n - self.free_attempts))
        return max(0.0, last + delay - self._clock())

    def login(self, password: str, client: str) -> tuple[str | None, str]:
        """(token or None, message)."""
        if not self.enabled:
            return None, "No admin password is set: everything is open."
        wait = self.wait_s(client)
        if wait > 0:
            return None, f"Too many wrong passwords: try again in {wait:.0f} s."
        ok = hmac.compare_digest(hashlib.sha256((password or "").encode()).digest(), self._digest)
        with self._lock:
            if ok:
                self._fails.pop(client, None)
            else:
                n, _ = self._fails.get(client, (0, 0.0))
                self._fails[client] = (n + 1, self._clock())
                if len(self._fails) > 100_000:  # bounded memory under a flood of distinct clients
                    self._fails.pop(next(iter(self._fails)))
        if not ok:
            return None, "Wrong password."
        return self.issue(), "Logged in as admin."

    def issue(self) -> str:
        body = f"admin.{int(self._wall() + self.ttl_s)}.{secrets.token_hex(8)}"
        return f"{body}.{self._mac(body)}"

    def valid(self, token) -> bool:
        if not isinstance(token, str) or token.count(".") != 3:
            return False
        body, mac = token.rsplit(".", 1)
        if not hmac.compare_digest(mac, self._mac(body)):
            return False
        try:
            return int(body.split(".")[1]) > self._wall()
        except ValueError:
            return False

    def _mac(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()
