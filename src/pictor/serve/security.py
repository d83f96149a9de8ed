"""What keeps the server safe to expose: API key, cross-site check, body caps, request limits, prompt policy.

The guard is plain ASGI middleware, so it runs before routing and body parsing: an unauthenticated or
cross-site request learns nothing about the API and costs no JSON parsing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs

from starlette.exceptions import HTTPException

from pictor.serve.a1111_errors import a1111_body, a1111_status, is_a1111_path
from pictor.serve.errors import APIError
from pictor.serve.settings import Limits, ServeSettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SIGNED_IMAGE = re.compile(r"^/v1/images/([0-9a-f]{32})$")

# The web page loads only its own files; images may be blob: URLs fetched with the API key.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


# -- signed image URLs ------------------------------------------------------------------------------


def sign_image(api_key: str, image_id: str, expires: int) -> str:
    msg = f"{image_id}:{expires}".encode()
    return hmac.new(api_key.encode(), msg, hashlib.sha256).hexdigest()[:32]


def signed_query(api_key: str | None, image_id: str, ttl: int) -> str:
    """Query string that lets a URL fetch one image without the Authorization header (``<img src>``)."""
    if api_key is None:
        return ""
    expires = int(time.time()) + ttl
    return f"?exp={expires}&sig={sign_image(api_key, image_id, expires)}"


def valid_signature(api_key: str, image_id: str, query: bytes) -> bool:
    args = parse_qs(query.decode("latin-1"))
    exp, sig = args.get("exp", [""])[0], args.get("sig", [""])[0]
    if not exp.isdigit() or int(exp) < time.time():
        return False
    return hmac.compare_digest(sig, sign_image(api_key, image_id, int(exp)))


# -- the guard middleware ---------------------------------------------------------------------------


class BodyTooLarge(HTTPException):
    """An HTTPException so that FastAPI's body reader passes it on instead of turning it into a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body too large: the limit is {limit} bytes")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def _own_origin(scope: Scope) -> str:
    scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
    return f"{scheme}://{_header(scope, b'host') or ''}".lower()


# The pictures one request may carry: an edit's source and mask, and a reference, context, control, Redux and
# IP-Adapter picture; a generation's JSON the last five, base64 (4/3 of their bytes). A server with
# ControlNets loaded takes one more picture per ControlNet (at most settings.MAX_CONTROLNETS), and only such a
# server.
MULTIPART_PICTURES = 7
JSON_PICTURES = 5


def multipart_limit(limits: Limits, controlnets: int = 0) -> int:
    return (MULTIPART_PICTURES + controlnets) * limits.max_upload_bytes + 64 * 1024


def json_limit(limits: Limits, controlnets: int = 0) -> int:
    return limits.max_body_bytes + (JSON_PICTURES + controlnets) * -(-4 * limits.max_upload_bytes // 3)


class Guard:
    """API key on /v1 and /sdapi (there as HTTP Basic's password too), same-origin check for state changes,
    body size caps, security headers.

    `controlnets`: how many ControlNets the served model has, each a further picture a request carries."""

    def __init__(self, app: ASGIApp, settings: ServeSettings, controlnets: int = 0) -> None:
        self.app = app
        self.settings = settings
        self.controlnets = controlnets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        a1111 = is_a1111_path(scope["path"])  # /sdapi answers in A1111's error shape
        refusal = self._refusal(scope)
        if refusal is not None:
            await _send_error(send, refusal, a1111)
            return
        limit = self._body_limit(scope)
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _send_error(
                send, APIError(413, self._too_large(scope, limit), code="body_too_large"), a1111
            )
            return
        received = 0

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # a chunked body without Content-Length
                raise BodyTooLarge(limit)
            return message

        path = scope["path"]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),  # signed image URLs stay on this page
                    (b"x-frame-options", b"DENY"),
                ]
                if path == "/" or path.startswith("/static/"):
                    headers.append((b"content-security-policy", PAGE_CSP.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, capped_receive, send_with_headers)

    def _too_large(self, scope: Scope, limit: int) -> str:
        nets = self.controlnets
        among = f", {nets} of them ControlNet pictures" if nets else ""
        if (_header(scope, b"content-type") or "").lower().startswith("multipart/"):
            each = self.settings.limits.max_upload_bytes
            return (
                f"request body too large: a multipart request may hold up to {limit} bytes in all "
                f"({MULTIPART_PICTURES + nets} images of at most {each} bytes each{among}, and the form "
                "fields)"
            )
        return (
            f"request body too large: the limit is {limit} bytes ({self.settings.limits.max_body_bytes} "
            f"for the fields, and up to {JSON_PICTURES + nets} base64 pictures of at most "
            f"{self.settings.limits.max_upload_bytes} bytes each{among})"
        )

    def _body_limit(self, scope: Scope) -> int:
        limits = self.settings.limits
        ctype = (_header(scope, b"content-type") or "").lower()
        # multipart carries up to seven images (an edit's source and mask, and its reference, context,
        # control, Redux and IP-Adapter pictures), each under the upload cap, plus room for the form fields;
        # JSON the five pictures a generation takes, base64, beside its fields; and each one picture per
        # ControlNet
        if ctype.startswith("multipart/"):
            return multipart_limit(limits, self.controlnets)
        return json_limit(limits, self.controlnets)

    def _refusal(self, scope: Scope) -> APIError | None:
        method, path = scope["method"], scope["path"]
        origin = _header(scope, b"origin")
        # Browsers send Origin on cross-site POST/DELETE; a form or fetch from another site must not be able
        # to run or cancel jobs with the user's ambient access to a loopback server.
        if method not in SAFE_METHODS and origin is not None and origin.lower() != _own_origin(scope):
            return APIError(
                403,
                f"cross-site request refused: Origin '{origin}' is not this server's origin",
                code="cross_origin",
            )
        key = self.settings.api_key
        a1111 = is_a1111_path(path)
        # /metrics tells job counts and rejections to whoever asks, so with a key it needs the key too
        # (Prometheus sends it with `authorization: {credentials: KEY}`); probes and the page stay open.
        if key is None or not (path in ("/v1", "/metrics") or path.startswith("/v1/") or a1111):
            return None
        auth = _header(scope, b"authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
            return None
        # A1111's clients authenticate with HTTP Basic (its --api-auth USER:PASSWORD): the key is the password
        if a1111 and scheme.lower() == "basic" and _basic_key(_basic_password(token), key):
            return None
        if a1111:
            message = (
                "invalid API key: send the server's key as the HTTP Basic password, or as the Bearer token"
            )
            if not auth:
                message = (
                    "missing API key: send the server's key as the password of HTTP Basic auth (any user "
                    "name; A1111's --api-auth), or the header 'Authorization: Bearer YOUR_KEY'"
                )
            headers = {"WWW-Authenticate": 'Basic realm="pictor", charset="UTF-8"'}
            return APIError(401, message, code="invalid_api_key", headers=headers)
        m = SIGNED_IMAGE.match(path)
        if (
            method in ("GET", "HEAD")
            and m
            and valid_signature(key, m.group(1), scope.get("query_string", b""))
        ):
            return None
        message = (
            "invalid API key" if auth else "missing API key: send the header 'Authorization: Bearer YOUR_KEY'"
        )
        if m and not auth and b"sig=" in scope.get("query_string", b""):
            message = (
                "this image URL's signature is invalid or has expired: fetch the job again "
                "(GET /v1/jobs/{id}) for fresh URLs, or send the header 'Authorization: Bearer YOUR_KEY'"
            )
        return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _basic_password(token: str) -> bytes:
    """The password of an HTTP Basic credential (base64 of USER:PASSWORD, UTF-8), or b"" when it is none."""
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return b""
    _user, colon, password = decoded.partition(b":")
    return password if colon else b""


def _basic_key(password: bytes, key: str) -> bool:
    """Whether a Basic password is the key: its UTF-8 bytes (httpx, browsers, Open WebUI), or its Latin-1 ones
    (Python's requests, which webuiapi uses, encodes a password so) when the key has them."""
    match = hmac.compare_digest(password, key.encode())
    try:
        latin = key.encode("latin-1")
    except UnicodeEncodeError:
        return match
    return hmac.compare_digest(password, latin) or match


async def _send_error(send: Send, error: APIError, a1111: bool = False) -> None:
    """`error` as the answer; `a1111`: in A1111's error shape (a request to /sdapi)."""
    body = json.dumps(a1111_body(error) if a1111 else error.body()).encode()
    status = a1111_status(error) if a1111 else error.status
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- request limits and prompt policy ---------------------------------------------------------------


def check_limits(
    limits: Limits, prompt: str, n: int, width: int | None, height: int | None, steps: int | None
) -> None:
    """Raise a 400 naming the limit; the pipeline checks the rest (multiples of the patch, samplers...)."""
    if len(prompt) > limits.max_prompt_chars:
        raise APIError(
            400,
            f"prompt is {len(prompt)} characters; the limit is {limits.max_prompt_chars}",
            param="prompt",
            code="prompt_too_long",
        )
    if n > limits.max_images:
        raise APIError(
            400,
            f"n is {n}; this server makes at most {limits.max_images} images per request",
            param="n",
            code="too_many_images",
        )
    if width is not None and height is not None and width * height > limits.max_pixels:
        raise APIError(
            400,
            f"size {width}x{height} is {width * height} pixels; the limit is {limits.max_pixels} "
            f"(e.g. {int(limits.max_pixels**0.5)}x{int(limits.max_pixels**0.5)})",
            param="size",
            code="size_too_large",
        )
    if steps is not None and steps > limits.max_steps:
        raise APIError(
            400, f"steps is {steps}; the limit is {limits.max_steps}", param="steps", code="too_many_steps"
        )


def check_text(limits: Limits, **texts: str | None) -> None:
    """A 400 for a text field longer than the prompt limit, or not valid Unicode: a lone surrogate, which a
    JSON escape ("\\ud800") can carry but UTF-8 cannot, so the job could be neither stored nor sent back."""
    for name, text in texts.items():
        if text is None:
            continue
        if len(text) > limits.max_prompt_chars:
            raise APIError(
                400,
                f"{name} is {len(text)} characters; the limit is {limits.max_prompt_chars}",
                param=name,
                code="prompt_too_long" if "prompt" in name else "text_too_long",
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise APIError(
                400,
                f"{name} is not valid Unicode text: it holds a lone surrogate (U+{ord(text[exc.start]):04X}) "
                f"at character {exc.start}; send UTF-8 text",
                param=name,
                code="invalid_text",
            ) from None


class PromptPolicy(Protocol):
    """A hook deciding whether a prompt may run: None to allow, or the reason to refuse."""

    def __call__(self, prompt: str, negative_prompt: str) -> str | None: ...


class BlockList:
    """Refuses prompts holding a listed word or phrase (whole words, case-insensitive)."""

    def __init__(self, words: tuple[str, ...] | list[str]) -> None:
        self.words = tuple(w.strip().lower() for w in words if w.strip())
        self._pattern = (
            re.compile(r"\b(" + "|".join(re.escape(w) for w in self.words) + r")\b", re.IGNORECASE)
            if self.words
            else None
        )

    @classmethod
    def from_file(cls, path: str | Path) -> BlockList:
        """One word or phrase per line; blank lines and lines starting with # are skipped."""
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        return cls([ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")])

    def __call__(self, prompt: str, negative_prompt: str) -> str | None:
        if self._pattern is None:
            return None
        m = self._pattern.search(prompt)
        return f"the prompt contains the blocked term '{m.group(1).lower()}'" if m else None


def check_policy(
    policy: PromptPolicy | None,
    prompt: str,
    negative_prompt: str,
    phrases: Sequence[str] = (),
    regions: Sequence[dict[str, Any]] | None = None,
) -> None:
    """Refuse a request the policy refuses: its prompt, any layout phrase (a phrase steers the image
    through the layout adapter as the prompt does) or any region's prompt (`parse_regions`' dicts: each is
    the prompt of its part of the image)."""
    if policy is None:
        return
    checks = [("prompt", "", prompt, negative_prompt)]
    checks += [("layout", f"layout box {i}: ", phrase, "") for i, phrase in enumerate(phrases)]
    checks += [("regions", f"region {i}: ", region["prompt"], "") for i, region in enumerate(regions or ())]
    for param, where, text, negative in checks:
        reason = policy(text, negative)
        if reason:
            raise APIError(
                400,
                f"request refused by this server's prompt policy: {where}{reason}",
                param=param,
                code="content_policy_violation",
            )
