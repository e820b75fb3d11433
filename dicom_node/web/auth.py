"""Who may use the console: password hashes or a start-up token, sessions, CSRF, login limits.

Why these choices:

* Passwords are stored only as Argon2id hashes (``argon2-cffi``: the Password Hashing
  Competition winner, memory-hard, so a stolen config does not give passwords away cheaply).
  ``dicom-node hash-password`` makes them.
* Without configured users (the embedded default) a random token is made at every start and
  printed with the login link, as Jupyter does: the console is never open without a secret.
* Sessions live in the node's memory (a restart logs everyone out, which is fine for an
  operations console); the cookie holds only a random id, ``HttpOnly`` and ``SameSite=Strict``,
  ``Secure`` over TLS.
* Every state-changing request carries the session's CSRF token (a hidden form field or the
  ``X-CSRF-Token`` header); the login form itself is bound to a pre-login cookie.
* Failed logins are limited per client address (``MAX_FAILURES`` per ``FAILURE_WINDOW``).  The
  check and the record are one step (:meth:`LoginLimiter.attempt` counts a login as failed until
  it succeeds), so concurrent wrong logins cannot all pass the check before any is recorded.
* The client address is the TCP peer's; ``X-Forwarded-For`` is believed only from a peer in
  ``web.trusted_proxies`` (default: none), else anyone could pick a fresh address per guess.
* Argon2 costs 64 MiB and both cores for a while per check: at most ``HASHES_AT_ONCE`` run at
  a time, on a thread of lowest CPU priority (:func:`hash_executor`), a login waits at most
  ``HASH_WAIT`` seconds for its turn, and beyond ``HASH_QUEUE`` waiting ones it gets 503 after
  ``BUSY_PAUSE`` (a client waiting for its answer cannot make the node answer faster), so a
  login flood costs neither gigabytes nor the DICOM listener's answer times.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import anyio
    from argon2 import PasswordHasher

# An address of web.trusted_proxies (a network) or of a peer
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

__all__ = ["hash_password", "verify_password", "Sessions", "Session", "LoginLimiter", "new_token", "same",
           "SESSION_COOKIE", "LOGIN_COOKIE", "MAX_FAILURES", "FAILURE_WINDOW", "HASHES_AT_ONCE", "HASH_WAIT",
           "HASH_QUEUE", "BUSY_PAUSE", "hash_executor", "HashTurns", "BearerTokens", "client_address", "proxy_networks"]

SESSION_COOKIE = "dicom_node_session"
LOGIN_COOKIE = "dicom_node_login"  # binds the login form's CSRF token to this browser
MAX_FAILURES = 5  # failed logins per client address ...
FAILURE_WINDOW = 300.0  # ... within this many seconds, then 429 until the window has passed
HASHES_AT_ONCE = 1  # Argon2 verifications running at once (64 MiB and up to 4 threads each)
HASH_WAIT = 5.0  # seconds a login waits for its turn to be checked, then 503
HASH_QUEUE = 20  # logins waiting at most; beyond that 503 ...
BUSY_PAUSE = 1.0  # ... after this many seconds


def _hasher() -> PasswordHasher:
    from argon2 import PasswordHasher

    return PasswordHasher()  # argon2-cffi's defaults: RFC 9106 low-memory profile (Argon2id, 64 MiB)


def hash_password(password: str) -> str:
    """An Argon2id hash for ``web.users`` in the config."""
    return _hasher().hash(password)


_DUMMY_HASH: list[str] = []


def verify_password(hashed: str | None, password: str) -> bool:
    """True when ``password`` matches ``hashed``; an unknown user (None) costs the same time."""
    from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

    if hashed is None:
        if not _DUMMY_HASH:
            _DUMMY_HASH.append(hash_password(secrets.token_urlsafe(16)))
        hashed, password = _DUMMY_HASH[0], password + "\0never"
    try:
        return bool(_hasher().verify(hashed, password))
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def _lowest_priority() -> None:
    """Nice 19 for the calling thread: on Linux niceness is per thread, and libargon2's lane
    threads inherit it, so Argon2 gets the CPU only when C-STOREs and translations leave it."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux: one check at a time must do
        pass


def hash_executor() -> ThreadPoolExecutor:
    """The threads that run :func:`verify_password` for the console (``HASHES_AT_ONCE``)."""
    return ThreadPoolExecutor(max_workers=HASHES_AT_ONCE, thread_name_prefix="argon2", initializer=_lowest_priority)


class HashTurns:
    """Argon2 verifications for the web side's coroutines (console logins, STOW-RS bearer tokens):
    ``HASHES_AT_ONCE`` at a time on :func:`hash_executor`'s threads, a wait of at most
    ``HASH_WAIT`` for a turn, at most ``HASH_QUEUE`` waiting.  One per web app, so logins and
    ingest tokens share the bound.  Made on the web thread's event loop at first use."""

    def __init__(self) -> None:
        self._slots: anyio.CapacityLimiter | None = None
        self._threads: ThreadPoolExecutor | None = None

    async def verify(self, hashed: str | None, secret: str) -> bool | None:
        """:func:`verify_password` in its turn; None: no turn within ``HASH_WAIT`` (answer 503)."""
        import asyncio

        import anyio

        if self._slots is None or self._threads is None:  # both made together, at first use
            self._slots, self._threads = anyio.CapacityLimiter(HASHES_AT_ONCE), hash_executor()
        slots, threads = self._slots, self._threads
        if slots.statistics().tasks_waiting >= HASH_QUEUE:
            await anyio.sleep(BUSY_PAUSE)
            return None
        turn = False
        with anyio.move_on_after(HASH_WAIT):
            await slots.acquire()
            turn = True
        if not turn:
            return None
        try:
            return await asyncio.wrap_future(threads.submit(verify_password, hashed, secret))
        finally:
            slots.release()


class BearerTokens:
    """Checks STOW-RS bearer tokens against the configured Argon2 hashes.

    A token that verified once is remembered as an HMAC (with a key of this process) so that a
    client posting study after study costs one Argon2 verification, not one per request; the
    memory is dropped when the configured hashes change (a reload that removes a token)."""

    def __init__(self, turns: HashTurns) -> None:
        self.turns = turns
        self._key = secrets.token_bytes(32)
        self._hashes: tuple[str, ...] = ()
        self._known: dict[bytes, str] = {}  # HMAC of a token -> the hash it matched

    def _digest(self, token: str) -> bytes:
        return hmac.new(self._key, token.encode(), hashlib.sha256).digest()

    async def check(self, hashes: list[str], token: str) -> bool | None:
        """True when ``token`` matches one of ``hashes``; None: the node is too busy to check."""
        if tuple(hashes) != self._hashes:
            self._hashes, self._known = tuple(hashes), {}
        digest = self._digest(token)
        if digest in self._known:
            return True
        for hashed in hashes:
            ok = await self.turns.verify(hashed, token)
            if ok is None:
                return None
            if ok:
                self._known[digest] = hashed
                return True
        return False

    def matched(self, token: str) -> str | None:
        """The hash a token that :meth:`check` accepted matched (its name is the client's identity)."""
        return self._known.get(self._digest(token))


def new_token() -> str:
    return secrets.token_urlsafe(32)


def same(a: str | None, b: str | None) -> bool:
    """Constant-time comparison of two secrets (False when either is missing)."""
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


@dataclass
class Session:
    user: str
    csrf: str = field(default_factory=new_token)
    last_seen: float = field(default_factory=time.time)
    flash: str | None = None  # what the last action did, shown once on the next page


class Sessions:
    """Logged-in sessions by their random cookie id, ending after ``idle_seconds`` unused."""

    def __init__(self, idle_seconds: float) -> None:
        self.idle_seconds = idle_seconds
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, user: str) -> tuple[str, Session]:
        sid, session = new_token(), Session(user)
        with self._lock:
            self._sessions[sid] = session
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        now = time.time()
        with self._lock:
            for old in [k for k, s in self._sessions.items() if now - s.last_seen > self.idle_seconds]:
                del self._sessions[old]
            session = self._sessions.get(sid)
            if session is not None:
                session.last_seen = now
            return session

    def end(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)


class LoginLimiter:
    """Counts failed logins per client address; ``blocked`` says for how many seconds more."""

    def __init__(self, max_failures: int = MAX_FAILURES, window: float = FAILURE_WINDOW) -> None:
        self.max_failures, self.window = max_failures, window
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    MAX_CLIENTS = 10_000  # addresses remembered at most (a scan from many addresses cannot fill memory)

    def _recent(self, client: str, now: float) -> list[float]:
        if len(self._failures) > self.MAX_CLIENTS:
            self._failures = {c: t for c, t in self._failures.items() if t and now - t[-1] < self.window}
        times = [t for t in self._failures.get(client, []) if now - t < self.window]
        self._failures[client] = times
        return times

    def blocked(self, client: str) -> float:
        now = time.time()
        with self._lock:
            return self._wait(self._recent(client, now), now)

    def _wait(self, times: list[float], now: float) -> float:
        return max(0.0, times[0] + self.window - now) if len(times) >= self.max_failures else 0.0

    def attempt(self, client: str) -> float:
        """Check and record in one step: 0 when ``client`` may try (the try counts as failed
        until :meth:`succeeded` or :meth:`undo`), else the seconds it must wait."""
        now = time.time()
        with self._lock:
            times = self._recent(client, now)
            wait = self._wait(times, now)
            if not wait:
                times.append(now)
            return wait

    def undo(self, client: str) -> None:
        """Take back the newest try of ``client`` (it was never checked: the node was busy)."""
        with self._lock:
            times = self._failures.get(client)
            if times:
                times.pop()

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


def proxy_networks(trusted: list[str] | tuple[str, ...]) -> tuple[Network, ...]:
    """``web.trusted_proxies`` (addresses or CIDRs, checked by the config) as networks."""
    return tuple(ipaddress.ip_network(t, strict=False) for t in trusted)


def _address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def client_address(peer: str, forwarded_for: str | None, trusted: tuple[Network, ...]) -> str:
    """Who is asking: the TCP peer, or, when the peer is a trusted proxy, the nearest address
    in ``X-Forwarded-For`` that is not itself a trusted proxy (the entries further left are
    whatever the client wrote, so they are never believed)."""
    address = _address(peer)
    if not trusted or not forwarded_for or address is None or not any(address in n for n in trusted):
        return peer
    for hop in reversed(forwarded_for.split(",")):
        hop_address = _address(hop)
        if hop_address is None:
            return peer  # not an address: the proxy did not write it; count the proxy itself
        if not any(hop_address in n for n in trusted):
            return str(hop_address)
    return peer
