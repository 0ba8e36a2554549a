"""What the front checks before BentoML reads a request, in this order:

1. the API token, when one is set (401; serving/access.py);
2. the method: the APIs take POST only (405 with Allow; BentoML's router for raw bodies answered 500);
3. room in the budget of request bytes in flight (503 with Retry-After; serving/admission.py);
4. the body: 413 over the size limit (by Content-Length, then by the bytes received), 415 for a Content-Type the API
   does not take (BentoML read any other body as JSON and answered "Invalid JSON"), 408 when no byte of it arrives
   for CIFAR100_BODY_TIMEOUT_S; and, for multipart bodies, as the chunks pass (python-multipart's streaming parser):
   400 for framing errors (BentoML answers 500 to a multipart body it cannot parse), 400 for a text field where the
   API takes files (BentoML's `Path` input fetches such a field as a URL, or opens it as a local path: the service
   never does), 413 past CIFAR100_MAX_IMAGES files (Starlette's parser failed at 1,000 with a 500).

Every refusal is {"error": "..."}; one made before the body has been read to its end also closes the connection
rather than read the rest. Plain-text 404 and 405 answers (Starlette's, for the other routes) become the same JSON. A
client that hangs up before its body is complete costs one log line.

A raw body goes to the front's own endpoint for it (`raw_body`), as BentoML's APIs take multipart or JSON only (and
JSON cannot carry files): an .npy file for /classify_batch (Content-Type application/x-npy or
application/octet-stream), one image file for /classify (image/*).
"""
import asyncio
import json
import logging

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from serving import access
from serving.admission import Overloaded
from serving.images import InputError

log = logging.getLogger("bentoml.service")
NPY_TYPES = (b"application/x-npy", b"application/octet-stream")
JSON_ANSWER = (b"content-type", b"application/json")


def error(e, close=False):
    """The JSON answer to a refused request (InputError or Overloaded); CLOSE: and the connection is closed after."""
    headers = {"Retry-After": str(e.retry_after)} if isinstance(e, Overloaded) else {}
    if isinstance(e, InputError) and e.status == 405:
        headers["Allow"] = "POST"
    if close:
        headers["Connection"] = "close"
    return JSONResponse({"error": str(e)}, status_code=e.status, headers=headers)


# What each API takes beside BentoML's multipart form: (whether a media type is its raw body, what it takes), and its
# multipart form's text fields (every other part must be a file).
BODIES = {"/classify": (lambda kind: kind.startswith(b"image/"), "image files as multipart/form-data (field images) "
                        "or one image file as the body (Content-Type image/*)"),
          "/classify_batch": (lambda kind: kind in NPY_TYPES, "an .npy file as multipart/form-data (field images) or "
                              "as the body (Content-Type application/x-npy)")}
TEXT_FIELDS = {"/classify": (), "/classify_batch": (b"probabilities",)}


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


class MultipartCheck:
    """Follows a multipart/form-data body as its chunks arrive: its framing, and its parts. A part is a file when its
    Content-Disposition has a filename (Starlette's rule, read with the same function); any other part must be one of
    TEXT_FIELDS, and there may be at most MAX_FILES files. Raises InputError or MultipartParseError from `write`."""

    def __init__(self, boundary, text_fields, max_files):
        self.text_fields, self.max_files, self.files = text_fields, max_files, 0
        self.header, self.value, self.disposition = b"", b"", b""
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self.part_begins, "on_header_field": self.header_field,
            "on_header_value": self.header_value, "on_header_end": self.header_ends,
            "on_headers_finished": self.headers_finished})

    def write(self, chunk):
        self.parser.write(chunk)

    def part_begins(self):
        self.disposition = b""

    def header_field(self, data, start, end):
        self.header += data[start:end]

    def header_value(self, data, start, end):
        self.value += data[start:end]

    def header_ends(self):
        if self.header.lower() == b"content-disposition":
            self.disposition = self.value
        self.header, self.value = b"", b""

    def headers_finished(self):
        _, options = parse_options_header(self.disposition)
        if b"filename" in options:
            self.files += 1
            if self.files > self.max_files:
                raise InputError(f"images: more than {self.max_files} files (CIFAR100_MAX_IMAGES); split the batch",
                                 413)
        elif options.get(b"name") not in self.text_fields:
            name = options.get(b"name", b"").decode("latin-1")[:100]
            raise InputError(f"{name or 'a part without a name'}: a text field where files are expected; upload the "
                             "file itself (a part with a filename): the service fetches no URL and opens no path")


def multipart_check(content_type, path, max_files):
    """A MultipartCheck for a multipart body sent to PATH, or None for other bodies."""
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        return None
    if not params.get(b"boundary"):
        raise InputError("multipart/form-data without a boundary in Content-Type")
    return MultipartCheck(params[b"boundary"], TEXT_FIELDS.get(path, ()), max_files)


class RequestGuard:
    def __init__(self, app, max_bytes, budget, max_files, body_timeout_s, token=None, raw_app=None):
        self.app, self.max_bytes, self.budget, self.max_files = app, max_bytes, budget, max_files
        self.body_timeout_s, self.token, self.raw_app = body_timeout_s, token, raw_app

    def too_big(self):
        return InputError(f"request body over the limit of {self.max_bytes} bytes (CIFAR100_MAX_BODY_MB)", 413)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        # Whether a body may follow the head: then a refusal closes the connection rather than read it.
        body = length not in (None, b"0") or b"transfer-encoding" in headers
        if self.token and not access.open_path(scope["path"]):
            if why := access.refusal(headers.get(b"authorization"), self.token):
                return await JSONResponse({"error": why}, status_code=401, headers={
                    "WWW-Authenticate": 'Bearer realm="cifar100"', **({"Connection": "close"} if body else {})})(
                        scope, receive, send)
        content_type = headers.get(b"content-type", b"")
        try:
            if scope["path"] in BODIES and scope["method"] != "POST":
                raise InputError(f"{scope['path']} takes POST only, not {scope['method']}", 405)
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                raise self.too_big()
            if scope["method"] == "POST" and (why := unsupported(scope["path"], content_type)):
                raise InputError(why, 415)
            framing = multipart_check(content_type, scope["path"], self.max_files)
            # A body of unknown length counts as the largest allowed.
            size = int(length) if length is not None and length.isdigit() else self.max_bytes if body else 0
            self.budget.admit(size)
        except (InputError, Overloaded) as e:
            if isinstance(e, Overloaded):
                log.warning("refused %s %s: %s", scope["method"], scope["path"], e)
            return await error(e, close=body)(scope, receive, send)
        app = self.raw_app if self.raw_app and raw_body(scope["path"], content_type) else self.app
        try:
            await self.checked(app, scope, receive, send, framing, body)
        finally:
            self.budget.release(size)

    async def checked(self, app, scope, receive, send, framing, body):
        received, failure, replied, complete, held = 0, None, False, not body, None

        async def checked_receive():
            nonlocal received, failure, complete
            if complete:   # the app waits for the client to hang up (or the end of the response): no deadline
                return await receive()
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    message = await receive()
            except TimeoutError:
                failure = InputError(f"request body stalled: no bytes for {self.body_timeout_s:g} s "
                                     "(CIFAR100_BODY_TIMEOUT_S)", 408)
                raise failure from None
            chunk = message.get("body", b"")
            received += len(chunk)
            complete = not message.get("more_body", False)
            try:
                if received > self.max_bytes:
                    raise self.too_big()
                if framing is not None:
                    framing.write(chunk)
            except (InputError, MultipartParseError) as e:
                failure = e if isinstance(e, InputError) else InputError(f"malformed multipart body: {e}")
                raise failure from None
            return message

        async def guarded_send(message):
            nonlocal replied, held
            if failure is not None:   # once the body failed a check, whatever the app answers becomes our 4xx
                if not replied:
                    replied = True
                    await error(failure, close=not complete)(scope, receive, send)
                return
            if held is not None or message["type"] == "http.response.start" and message["status"] in (404, 405) \
                    and JSON_ANSWER not in message.get("headers", ()):
                held = await self.as_json(held, message, scope, send)
                return
            await send(message)

        try:
            await app(scope, checked_receive, guarded_send)
        except InputError:
            if not replied:
                await error(failure, close=not complete)(scope, receive, send)
        except ClientDisconnect:
            log.info("%s %s: the client hung up before its body was complete (%d bytes received)", scope["method"],
                     scope["path"], received)

    @staticmethod
    async def as_json(held, message, scope, send):
        """A plain-text 404 or 405 answer (Starlette's, for the routes that are not the APIs') sent as {"error": ...},
        its Allow header kept. Returns what is held of it until its body is complete."""
        if held is None:
            return message, b""
        start, text = held[0], held[1] + message.get("body", b"")
        if message.get("more_body", False):
            return start, text
        headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() == b"allow"]
        why = text.decode(errors="replace").strip() or "Not Found"
        payload = json.dumps({"error": f"{why}: {scope['method']} {scope['path'][:200]}"}).encode()
        await send({**start, "headers": [*headers, JSON_ANSWER, (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
        return None
