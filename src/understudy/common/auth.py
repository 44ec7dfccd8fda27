"""Who may call what, on an engine and on the frontend.

Three kinds of route:
    OpenAI routes   /v1/*, /tokenize, /detokenize: with --api-key (or $UNDERSTUDY_API_KEY / $VLLM_API_KEY) set,
                    `Authorization: Bearer <one of the keys>` (or the admin token); else open
    operator routes /engine/control/*, /engine/generate, /registry/*, /admin/*: always the admin token,
                    `Authorization: Bearer <token>`
    the rest        /health, /live, /metrics, /version, /docs, /openapi.json: open
Without a credential: 401; with a credential that is not good for the route: 401 on the OpenAI routes (what
OpenAI answers for a wrong key), 403 on the operator routes. Bodies are OpenAI-style errors of type
"authentication_error" / "permission_error".

The admin token is one secret per user and machine, in a 0600 file that the first process to need it creates
(default: admin-token in $UNDERSTUDY_SOCKET_DIR or /tmp/understudy-$UID, the node's directory; --socket-dir
does not move it, so every engine, frontend, `up` and snapshot of the user on the machine shares it with no
flag). --admin-token-file FILE (or $UNDERSTUDY_ADMIN_TOKEN holding the token itself) for engines and
frontends on different machines: give them all the same one.

Torch-free and light (the option helpers are imported by --help).
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

API_KEY_ENVS = ("UNDERSTUDY_API_KEY", "VLLM_API_KEY")  # comma-separated keys; VLLM_API_KEY as vLLM reads it
ADMIN_TOKEN_ENV = "UNDERSTUDY_ADMIN_TOKEN"
ADMIN_TOKEN_NAME = "admin-token"
OPENAI_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
ADMIN_PREFIXES = ("/engine/control/", "/engine/generate", "/registry/", "/admin/")


def default_admin_token_file() -> Path:
    from understudy.memory.paths import default_socket_dir

    return default_socket_dir() / ADMIN_TOKEN_NAME


def load_admin_token(path: str | os.PathLike | None = None) -> str:
    """The admin token: FILE's content (created, 0600, with a new random token when missing); with no FILE,
    $UNDERSTUDY_ADMIN_TOKEN or the default file. Raises ValueError for an empty or unreadable file."""
    if path is None:
        env = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
        if env:
            return env
        path = default_admin_token_file()
        _private_dir(path.parent)
    path = Path(path)
    try:
        if not path.exists():
            _create_token_file(path)
        token = path.read_text().strip()
    except OSError as e:
        raise ValueError(f"--admin-token-file {path}: {e.strerror}") from None
    if not token:
        raise ValueError(f"--admin-token-file {path} is empty")
    return token


def _private_dir(d: Path) -> None:
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    if d.stat().st_uid != os.getuid():  # someone else's /tmp/understudy-$UID: their token would be ours
        raise ValueError(f"{d} belongs to another user: set $UNDERSTUDY_SOCKET_DIR or --admin-token-file")


def _create_token_file(path: Path) -> None:
    """Write a new token to a private temporary file, then link it into place: processes starting together
    all read the one that won (os.link fails when the name exists)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (secrets.token_urlsafe(32) + "\n").encode())
        os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def api_keys(flags: list[str] | tuple[str, ...] = ()) -> tuple[str, ...]:
    """--api-key values (each may hold several, comma-separated) and those of $UNDERSTUDY_API_KEY and
    $VLLM_API_KEY, in that order, without repeats."""
    out: list[str] = []
    for value in [*flags, *(os.environ.get(e, "") for e in API_KEY_ENVS)]:
        out += [k.strip() for k in value.split(",") if k.strip() and k.strip() not in out]
    return tuple(out)


def admin_headers(token_file: str | os.PathLike | None = None) -> dict[str, str]:
    """What a client of the operator routes sends (the token of load_admin_token(token_file))."""
    return {"Authorization": f"Bearer {load_admin_token(token_file)}"}


# -------------------------------------------------------------------------------------------- flags


def add_access_arguments(g: argparse._ArgumentGroup) -> None:
    """--api-key, --admin-token-file and the CORS flags (serve and frontend)."""
    g.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="clients of the OpenAI routes (/v1/*, /tokenize, /detokenize) must send `Authorization: "
                        "Bearer KEY`, else 401; repeat (or comma-separate) for several keys; also read from "
                        "$UNDERSTUDY_API_KEY and $VLLM_API_KEY (comma-separated) (default: none: open)")
    g.add_argument("--admin-token-file", default=None, metavar="FILE",
                   help="the file holding the admin token that the operator routes (/engine/control/*, "
                        "/engine/generate, /registry/*, /admin/*) require as `Authorization: Bearer TOKEN`; "
                        "created (0600, a random token) when missing. Engines, frontends and `up` of one user on "
                        "one machine share the default; give all of them the same FILE across machines "
                        "(default: $UNDERSTUDY_ADMIN_TOKEN if set, else admin-token in $UNDERSTUDY_SOCKET_DIR "
                        "or /tmp/understudy-$UID)")
    g.add_argument("--allowed-origins", action="append", default=[], metavar="ORIGIN",
                   help="CORS: browser pages from ORIGIN (e.g. https://app.example.com, or * for any) may call "
                        "the API; repeat for several (default: none: no CORS headers)")
    g.add_argument("--allowed-methods", action="append", default=[], metavar="METHOD",
                   help="CORS: the methods allowed from --allowed-origins; repeat for several (default: GET, "
                        "POST, OPTIONS)")
    g.add_argument("--allowed-headers", action="append", default=[], metavar="HEADER",
                   help="CORS: the request headers allowed from --allowed-origins; repeat for several (default: "
                        "Authorization, Content-Type, X-Request-Id)")


@dataclass(frozen=True)
class CORS:
    allowed_origins: tuple[str, ...] = ()  # empty: no CORS
    allowed_methods: tuple[str, ...] = ("GET", "POST", "OPTIONS")
    allowed_headers: tuple[str, ...] = ("Authorization", "Content-Type", "X-Request-Id")


def cors_of(options) -> CORS:
    """The CORS of parsed flags (a namespace or serve's AccessOptions): the defaults where a list is empty."""
    d = CORS()
    return CORS(tuple(options.allowed_origins), tuple(options.allowed_methods) or d.allowed_methods,
                tuple(options.allowed_headers) or d.allowed_headers)


@dataclass(frozen=True)
class Access:
    """The credentials an app checks (built once at start-up)."""

    admin_token: str
    api_keys: tuple[str, ...] = ()  # empty: the OpenAI routes are open

    @classmethod
    def from_flags(cls, api_key_flags: list[str] | tuple[str, ...], admin_token_file: str | None) -> "Access":
        return cls(admin_token=load_admin_token(admin_token_file), api_keys=api_keys(api_key_flags))

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def refusal(self, path: str, authorization: str | None) -> tuple[int, str, str] | None:
        """None when a request for PATH with this Authorization header may go on; else (status, error type,
        message)."""
        if path.startswith(ADMIN_PREFIXES):
            allowed: tuple[str, ...] = (self.admin_token,)
        elif path.startswith(OPENAI_PREFIXES) and self.api_keys:
            allowed = (*self.api_keys, self.admin_token)
        else:
            return None
        scheme, _, credential = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            return 401, "authentication_error", "no credential: send `Authorization: Bearer <key>`"
        credential = credential.strip()
        if any(hmac.compare_digest(credential.encode(), a.encode()) for a in allowed):
            return None
        if allowed == (self.admin_token,):
            return 403, "permission_error", f"{path} needs the admin token (--admin-token-file)"
        return 401, "authentication_error", "incorrect API key"


class AccessMiddleware:
    """Refuses requests without the credential their route needs (pure ASGI: streamed answers pass
    through untouched)."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] == "OPTIONS":  # CORS preflights carry no credential
            return await self.app(scope, receive, send)
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        refused = self.access.refusal(scope["path"], authorization)
        if refused is None:
            return await self.app(scope, receive, send)
        status, kind, message = refused
        body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def install_middleware(app, access: Access, cors: CORS) -> None:
    """The credential checks; outside them X-Request-Id (a refusal carries it too) and CORS (a preflight is
    answered before any check). Starlette runs the middleware added last first."""
    from understudy.common.request_id import RequestIdMiddleware

    app.add_middleware(AccessMiddleware, access=access)
    app.add_middleware(RequestIdMiddleware)
    if cors.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors.allowed_origins),
                           allow_methods=list(cors.allowed_methods), allow_headers=list(cors.allowed_headers),
                           allow_credentials="*" not in cors.allowed_origins, expose_headers=["X-Request-Id"])
