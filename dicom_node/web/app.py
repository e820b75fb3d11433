"""The console's pages and endpoints (Starlette, Jinja2 templates, ``prometheus_client``).

Why Starlette: a small, well-kept ASGI toolkit (the base of FastAPI) that needs no global
state, so a node builds its own app; uvicorn serves it in one thread of the node.  Pages
are rendered on the server with autoescaping Jinja2 templates (patient names are text, never
markup); a few lines of JavaScript refresh the open page.  Page handlers are plain functions:
Starlette runs them in its thread pool, so a slow query never blocks the event loop, and they
read the state database on the console's own connection, so they never hold up a C-STORE.

Without login: ``/health/live``, ``/health/ready``, ``/metrics`` (no patient data) and the
login page.  Everything else needs a session; every POST needs the session's CSRF token, except
STOW-RS ingest (``POST /dicomweb/{called_ae}/studies``, a bearer token: :mod:`.stow`).
"""
from __future__ import annotations

import functools
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import quote

from dicom_node.web.auth import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    HashTurns,
    LoginLimiter,
    Session,
    Sessions,
    client_address,
    new_token,
    proxy_networks,
    same,
)
from dicom_node.web.health import readiness
from dicom_node.web.stow import PATH as STOW_PATH
from dicom_node.web.stow import receiving, stow_endpoint
from dicom_node.web.templating import bar_chart, templates

if TYPE_CHECKING:  # the node's parts, imported by the node itself; the console only holds them
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from dicom_node.config import NodeConfig
    from dicom_node.ingest import Ingest
    from dicom_node.metrics import NodeMetrics
    from dicom_node.model_cache import ModelCache
    from dicom_node.spool import Spool
    from dicom_node.state import StateDB

__all__ = ["Console", "build_app", "BadRequest"]

log = logging.getLogger("dicom_node.web")

HERE = Path(__file__).resolve().parent
STUDIES_LISTED = 100
ASSOCIATIONS_LISTED = 50
ACTIONS_LISTED = 200
# Sent with every response: no framing, no foreign scripts or styles, no referrer leaking
# UIDs in URLs to other sites, pages with patient data never cached.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


@dataclass
class Console:
    """What the console needs of a running node."""

    config: NodeConfig
    spool: Spool
    db: StateDB  # the console's own connection
    models: ModelCache
    metrics: NodeMetrics
    listening: Callable[[], bool]
    wake: Callable[[], None]  # the node's workers look for work now (after a requeue or release)
    token: str | None = None  # the start-up login token (no users configured)
    sessions: Sessions = field(default_factory=lambda: Sessions(12 * 3600.0))
    limiter: LoginLimiter = field(default_factory=LoginLimiter)
    started_at: float = field(default_factory=time.time)
    role: str = "all"  # serve --role: what readiness checks (a worker has no listener, a receiver no models)
    node_id: str | None = None  # this node's row in the nodes table
    ingest: Ingest | None = None  # the store path STOW-RS shares with C-STORE (None: no receiving)

    @property
    def secure(self) -> bool:
        return self.config.web is not None and self.config.web.tls is not None

    @property
    def users(self) -> dict[str, str]:
        """``web.users`` (login name -> Argon2id hash); none: the start-up token logs in."""
        return self.config.web.users if self.config.web is not None else {}

    def configure(self, config: NodeConfig) -> None:
        """Take a reloaded config (the console's own settings, ``web``, need a restart)."""
        self.config = config


# ----------------------------------------------------------------------------- helpers


def _route_label(config: NodeConfig, name: str | None) -> str:
    r = config.route(name)
    if r is None:
        return "no route" if name is None else f"{name} (no longer configured)"
    return f"{r.name}: {r.called_ae} -> {r.model} -> {', '.join(r.destinations)}"


def _destination_text(dest: Any) -> str:
    """Where ``dest`` sends, in its kind's own words (``PACS@10.0.0.5:104``, ``/data/outbox``)."""
    from dicom_node.destinations import describe

    return describe(dest)


def _local_path(value: str | None, default: str = "/") -> str:
    """Only a path on this site may be a redirect target (no open redirects)."""
    value = str(value or "")
    return value if value.startswith("/") and not value.startswith("//") and "\\" not in value else default


class BadRequest(ValueError):
    """A form or path value the console cannot use: 400 with this message, nothing done."""


def _form_id(value: Any, what: str) -> int:
    """A database id from a form or a path: digits only, within SQLite's and PostgreSQL's
    64-bit integers (anything else would reach the database and fail there as a 500)."""
    text = str(value).strip()
    if not text.isascii() or not text.isdigit() or len(text) > 19 or int(text) >= 2**63:
        raise BadRequest(f"{what} must be a whole number below 2^63, not {text[:40]!r}")
    return int(text)


# ----------------------------------------------------------------------------- the app


def build_app(console: Console) -> ASGIApp:
    """The Starlette application of one node's console."""
    from prometheus_client import CONTENT_TYPE_LATEST
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    env = templates(HERE / "templates")
    refresh = console.config.web.refresh_seconds if console.config.web else 5.0
    proxies = proxy_networks(console.config.web.trusted_proxies if console.config.web else ())
    turns = HashTurns()  # Argon2, a few at a time (logins and STOW-RS tokens)
    checked = turns.verify

    def _client(request: Any) -> str:
        peer = request.client.host if request.client else "unknown"
        return client_address(peer, request.headers.get("x-forwarded-for"), proxies)

    def render(name: str, request: Any, session: Session | None, status: int = 200, **values: Any) -> Any:
        done = None
        if session is not None:
            done, session.flash = session.flash, None
        html = env.get_template(name).render(session=session, refresh=refresh, request=request,
                                             node=console.config.node, done=done, **values)
        return HTMLResponse(html, status_code=status)

    def session_of(request: Any) -> Session | None:
        return console.sessions.get(request.cookies.get(SESSION_COOKIE))

    def page(fn: Callable[[Any, Session], Any]) -> Callable[[Any], Any]:
        """A page behind the login (HTML: to the login page; anything else: 401)."""
        @functools.wraps(fn)
        def wrapper(request: Any) -> Any:
            session = session_of(request)
            if session is None:
                if "text/html" in request.headers.get("accept", "") and request.method == "GET":
                    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                    return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
                return JSONResponse({"error": "login required"}, status_code=401)
            return fn(request, session)
        return wrapper

    def action(fn: Callable[[Session, Any], str | None]) -> Callable[[Any], Any]:
        """A state-changing POST: a session and its CSRF token, or 401/403 and nothing done."""
        async def wrapper(request: Any) -> Any:
            session = session_of(request)
            if session is None:
                return JSONResponse({"error": "login required"}, status_code=401)
            form = await request.form()
            if not same(form.get("csrf_token") or request.headers.get("x-csrf-token"), session.csrf):
                log.warning("console: %s %s refused: missing or wrong CSRF token (user %s)", request.method,
                            request.url.path, session.user)
                return JSONResponse({"error": "missing or wrong CSRF token"}, status_code=403)
            try:
                session.flash = await run_in_threadpool(fn, session, form)  # shown once, on the next page
            except BadRequest as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            console.wake()
            return RedirectResponse(_local_path(form.get("back")), status_code=303)
        return wrapper

    # -- health and metrics (no login) -------------------------------------------------
    def live(request: Any) -> Any:
        return JSONResponse({"status": "live", "uptime_seconds": round(time.time() - console.started_at, 1)})

    def ready(request: Any) -> Any:
        checks = readiness(console)
        failing = [c.name for c in checks if not c.ok]
        body = {"status": "not ready" if failing else "ready", "failing": failing,
                "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks}}
        return JSONResponse(body, status_code=503 if failing else 200)

    def metrics(request: Any) -> Any:
        return Response(console.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    # -- login -------------------------------------------------------------------------
    def login_form(request: Any, status: int = 200, error: str | None = None, nxt: str = "/") -> Any:
        binding = new_token()
        response = render("login.html", request, None, status=status, error=error, csrf_token=binding,
                          next=nxt, with_users=bool(console.users))
        response.set_cookie(LOGIN_COOKIE, binding, httponly=True, samesite="strict", secure=console.secure,
                            max_age=3600)
        return response

    def start_session(user: str, request: Any, nxt: str) -> Any:
        sid, _ = console.sessions.create(user)
        console.limiter.succeeded(_client(request))
        console.db.operations.record_action(user, "login", _client(request), "ok")
        log.info("console: %s logged in from %s", user, _client(request))
        response = RedirectResponse(_local_path(nxt), status_code=303)
        response.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict", secure=console.secure)
        response.delete_cookie(LOGIN_COOKIE)
        return response

    def login_get(request: Any) -> Any:
        nxt = _local_path(request.query_params.get("next"))
        token = request.query_params.get("token")
        if token is not None and not console.users:
            # the link printed at start (as Jupyter's): log in and drop the token from the address bar
            if console.limiter.attempt(_client(request)):
                return login_form(request, 429, "too many failed logins: wait a few minutes", nxt)
            if same(token, console.token):
                return start_session("token", request, nxt)
            return login_form(request, 401, "wrong or expired token (it changes at every start of the node)", nxt)
        return login_form(request, nxt=nxt)

    async def login_post(request: Any) -> Any:
        form = await request.form()
        nxt = _local_path(form.get("next"))
        client = _client(request)
        if not same(form.get("csrf_token"), request.cookies.get(LOGIN_COOKIE)):
            return login_form(request, 403, "the login form expired: try again", nxt)
        wait = console.limiter.attempt(client)  # counts as failed from here until it succeeds
        if wait:
            log.warning("console: login from %s refused: too many failures", client)
            return login_form(request, 429, f"too many failed logins: try again in {wait:.0f} s", nxt)
        users = console.users
        user = str(form.get("user") or "").strip()[:100] if users else "token"
        secret = str(form.get("password") or "")
        ok = (await checked(users.get(user), secret)) if users else same(secret, console.token)
        if ok is None:
            console.limiter.undo(client)  # never checked: not a failure
            log.warning("console: login from %s refused: too many logins at once", client)
            response = login_form(request, 503, "too many logins at once: try again in a few seconds", nxt)
            response.headers["retry-after"] = "5"
            return response
        if ok:
            return await run_in_threadpool(start_session, user, request, nxt)
        await run_in_threadpool(console.db.operations.record_action, user or "-", "login-failed", client, "refused")
        log.warning("console: failed login for %r from %s", user, client)
        return login_form(request, 401, "wrong user or password" if users else "wrong token", nxt)

    async def logout(request: Any) -> Any:
        session = session_of(request)
        form = await request.form()
        if session is not None and same(form.get("csrf_token"), session.csrf):
            console.sessions.end(request.cookies.get(SESSION_COOKIE))
            await run_in_threadpool(console.db.operations.record_action, session.user, "logout", _client(request), "ok")
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    # -- pages -------------------------------------------------------------------------
    @page
    def overview(request: Any, session: Session) -> Any:
        db, config = console.db, console.config
        instances, deliveries = db.counts()
        disk = shutil.disk_usage(console.spool.root)
        activity = db.console.destination_activity()
        models = [{"key": name, "settings": s, "info": console.models.loaded.get(name),
                   "error": console.models.errors.get(name),
                   "routes": [r.called_ae for r in config.routes if r.model == name]}
                  for name, s in config.models.items()]
        destinations = [{"name": name, "text": _destination_text(d), **activity.get(name, {
            "pending": 0, "failed": 0, "held": 0, "last_success": None, "last_error": None, "last_error_at": None})}
            for name, d in config.destinations.items()]
        oldest = db.oldest_waiting()
        return render("overview.html", request, session, instances=instances, deliveries=deliveries,
                      chart=bar_chart(db.console.throughput()), disk=disk, watermark=config.storage.min_free_bytes,
                      used_share=(disk.total - disk.free) / disk.total if disk.total else 0.0,
                      models=models, destinations=destinations, checks=readiness(console),
                      fidelity=db.audit.fidelity_counts(), oldest=oldest, started_at=console.started_at,
                      nodes=db.cluster.nodes(), this_node=console.node_id,
                      receiving=receiving(config, db.counters.values()))

    @page
    def studies(request: Any, session: Session) -> Any:
        rows = console.db.console.studies(STUDIES_LISTED)
        for r in rows:
            r["route_label"] = _route_label(console.config, r["route"])
        return render("studies.html", request, session, studies=rows)

    @page
    def study(request: Any, session: Session) -> Any:
        found = console.db.console.study(request.path_params["uid"])
        if found is None:
            return render("message.html", request, session, status=404, title="Study not found",
                          message="No study with this Study Instance UID is in the node's database.")
        for inst in found["instances"]:
            inst["route_label"] = _route_label(console.config, inst["route"])
            inst["preview"] = console.spool.preview_path(inst["id"]).is_file()
        # routes whose outputs were all delivered: "Reprocess" (dicom_node.reprocessing says the rest)
        states: dict[str, set[str]] = {}
        for inst in found["instances"]:
            if inst["route"] is not None and inst.get("output"):
                states.setdefault(inst["route"], set()).add("purged" if inst.get("purged") else inst["state"])
        found["reprocessable"] = sorted(r for r, s in states.items() if s == {"delivered"})
        return render("study.html", request, session, study=found)

    @page
    def failures(request: Any, session: Session) -> Any:
        db = console.db
        return render("failures.html", request, session, failed=db.console.failures(), withheld=db.audit.withheld(),
                      associations=db.operations.associations(ASSOCIATIONS_LISTED),
                      notifications=db.outbox.recent(state="failed", limit=ASSOCIATIONS_LISTED),
                      waiting=db.outbox.recent(state="pending", limit=ASSOCIATIONS_LISTED))

    @page
    def actions_log(request: Any, session: Session) -> Any:
        return render("actions.html", request, session, actions=console.db.operations.actions(ACTIONS_LISTED))

    @page
    def preview(request: Any, session: Session) -> Any:
        try:
            path = console.spool.preview_path(_form_id(request.path_params["iid"], "the instance id"))
        except BadRequest as exc:
            return Response(str(exc), status_code=400, media_type="text/plain")
        if not path.is_file():
            return Response("no preview", status_code=404, media_type="text/plain")
        return FileResponse(path, media_type="image/png", headers={"cache-control": "private, no-store"})

    # -- operator actions --------------------------------------------------------------
    @action
    def requeue(session: Session, form: Any) -> str:
        iid = form.get("instance_id")
        ids = None if not iid else [_form_id(iid, "instance_id")]
        nd, ni = console.db.retry_failed(instance_ids=ids, user=session.user)
        log.info("console: %s requeued %d deliveries and %d translations", session.user, nd, ni)
        return f"requeued {nd} deliveries and {ni} translations"

    @action
    def reprocess(session: Session, form: Any) -> str:
        from dicom_node.errors import UserError

        study_uid = str(form.get("study_uid") or "").strip()
        route = str(form.get("route") or "").strip() or None
        if not study_uid:
            raise BadRequest("study_uid is required")
        try:
            queued = console.db.sources.reprocess(study_uid, route, user=session.user,
                                                  configured=[r.name for r in console.config.routes])
        except UserError as exc:
            return f"not reprocessed: {exc}"
        log.info("console: %s asked to reprocess %d instance(s)", session.user, sum(queued.values()))
        return "queued for translation again: " + ", ".join(f"{n} instance(s) of route {r}"
                                                            for r, n in sorted(queued.items()))

    def _withheld_action(verb: str) -> Callable[[Any], Any]:
        def run(session: Session, form: Any) -> str:
            uid = str(form.get("uid") or "").strip()
            everything = form.get("all") == "1"
            fn = console.db.audit.release if verb == "release" else console.db.audit.discard
            done = fn([uid] if uid else [], everything=everything, user=session.user)
            log.info("console: %s %s %d withheld output(s)", session.user,
                     "released" if verb == "release" else "discarded", len(done))
            return f"{'released' if verb == 'release' else 'dropped'} {len(done)} withheld output(s)"
        return action(run)

    routes = [
        Route("/health/live", live), Route("/health/ready", ready), Route("/metrics", metrics),
        Route("/login", login_get, methods=["GET"]), Route("/login", login_post, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", overview), Route("/studies", studies), Route("/studies/{uid}", study),
        Route("/failures", failures), Route("/actions", actions_log),
        Route("/previews/{iid}.png", preview),
        Route("/requeue", requeue, methods=["POST"]), Route("/reprocess", reprocess, methods=["POST"]),
        Route("/release", _withheld_action("release"), methods=["POST"]),
        Route("/discard", _withheld_action("discard"), methods=["POST"]),
        Route(STOW_PATH, stow_endpoint(console, turns, _client), methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    return _SecurityHeaders(Starlette(routes=routes))


class _SecurityHeaders:
    """ASGI middleware: :data:`SECURITY_HEADERS` on every response, ``no-store`` on pages."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                for k, v in SECURITY_HEADERS.items():
                    headers.append((k.encode(), v.encode()))
                if b"cache-control" not in present:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
