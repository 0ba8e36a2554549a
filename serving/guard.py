"""What the front checks before BentoML reads a request, in this order:

1. the API token, when one is set (401; serving/access.py);
2. room in the budget of request bytes in flight (503 with Retry-After; serving/admission.py);
3. the body: 413 over the size limit (by Content-Length, then by the bytes received), 415 for a Content-Type the API
   does not take (BentoML read any other body as JSON and answered "Invalid JSON"), 400 for multipart framing
   errors, found by python-multipart's streaming parser as the chunks pass (BentoML answers 500 to a multipart
   body it cannot parse).

A raw body goes to the front's own endpoint for it (`raw_body`), as BentoML's APIs take multipart or JSON only (and
JSON cannot carry files): an .npy file for /classify_batch (Content-Type application/x-npy or
application/octet-stream), one image file for /classify (image/*).
"""
import logging

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.responses import JSONResponse

from serving import access
from serving.admission import ByteBudget, Overloaded
from serving.images import InputError

log = logging.getLogger("bentoml.service")
NPY_TYPES = (b"application/x-npy", b"application/octet-stream")


def error(e):
    """The JSON answer to a refused request (InputError or Overloaded)."""
    headers = {"Retry-After": str(e.retry_after)} if isinstance(e, Overloaded) else None
    return JSONResponse({"error": str(e)}, status_code=e.status, headers=headers)


# The bodies each API takes beside BentoML's multipart form: (whether a media type is its raw body, what it takes).
BODIES = {"/classify": (lambda kind: kind.startswith(b"image/"), "image files as multipart/form-data (field images) "
                        "or one image file as the body (Content-Type image/*)"),
          "/classify_batch": (lambda kind: kind in NPY_TYPES, "an .npy file as multipart/form-data (field images) or "
                              "as the body (Content-Type application/x-npy)")}


def media_type(content_type):
    return content_type.split(b";")[0].strip().lower()


def raw_body(path, content_type):
    """Whether a request carries a raw body that the front's own endpoint for PATH takes."""
    return path in BODIES and BODIES[path][0](media_type(content_type))


def unsupported(path, content_type):
    """Why a POST to PATH cannot be read (its body is neither multipart nor the API's raw body), or None."""
    kind = media_type(content_type)
    if path not in BODIES or kind == b"multipart/form-data" or BODIES[path][0](kind):
        return None
    return f"{path} takes {BODIES[path][1]}; this request's Content-Type is {kind.decode(errors='replace') or 'missing'}"


def multipart_checker(content_type):
    """A parser that only checks multipart framing (no callbacks), or None for other bodies."""
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        return None
    if not params.get(b"boundary"):
        raise InputError("multipart/form-data without a boundary in Content-Type")
    return MultipartParser(params[b"boundary"])


class RequestGuard:
    def __init__(self, app, max_bytes, inflight_bytes, token=None, raw_app=None):
        self.app, self.max_bytes, self.token, self.raw_app = app, max_bytes, token, raw_app
        # Small requests keep a tenth of the budget (at least 16 MB) that bulk uploads cannot take, as long as a
        # body of the largest size still fits.
        reserve = min(max(inflight_bytes // 10, 16 << 20), inflight_bytes - max_bytes)
        self.budget = ByteBudget(inflight_bytes, reserve)

    def too_big(self):
        return InputError(f"request body over the limit of {self.max_bytes} bytes (CIFAR100_MAX_BODY_MB)", 413)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token and not access.open_path(scope["path"]):
            if why := access.refusal(headers.get(b"authorization"), self.token):
                return await JSONResponse({"error": why}, status_code=401, headers={
                    "WWW-Authenticate": 'Bearer realm="cifar100"'})(scope, receive, send)
        content_type = headers.get(b"content-type", b"")
        try:
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                raise self.too_big()
            if scope["method"] == "POST" and (why := unsupported(scope["path"], content_type)):
                raise InputError(why, 415)
            framing = multipart_checker(content_type)
            # A body of unknown length counts as the largest allowed.
            size = int(length) if length is not None and length.isdigit() else \
                self.max_bytes if scope["method"] in ("POST", "PUT", "PATCH") else 0
            self.budget.admit(size)
        except (InputError, Overloaded) as e:
            if isinstance(e, Overloaded):
                log.warning("refused %s %s: %s", scope["method"], scope["path"], e)
            return await error(e)(scope, receive, send)
        app = self.raw_app if self.raw_app and raw_body(scope["path"], content_type) else self.app
        try:
            await self.checked(app, scope, receive, send, framing)
        finally:
            self.budget.release(size)

    async def checked(self, app, scope, receive, send, framing):
        received, failure, replied = 0, None, False

        async def checked_receive():
            nonlocal received, failure
            message = await receive()
            chunk = message.get("body", b"")
            received += len(chunk)
            try:
                if received > self.max_bytes:
                    raise self.too_big()
                if framing is not None:
                    framing.write(chunk)
            except (InputError, MultipartParseError) as e:
                failure = e if isinstance(e, InputError) else InputError(f"malformed multipart body: {e}")
                raise failure from None
            return message

        async def guarded_send(message):  # once the body failed a check, whatever the app answers becomes our 4xx
            nonlocal replied
            if failure is None:
                return await send(message)
            if not replied:
                replied = True
                await error(failure)(scope, receive, send)

        try:
            await app(scope, checked_receive, guarded_send)
        except InputError:
            if not replied:
                await error(failure)(scope, receive, send)
