"""Who may call the service: anyone who reaches its port, or, when a token is set, only who presents it.

The token comes from CIFAR100_API_TOKEN, or from the file CIFAR100_API_TOKEN_FILE names (a mounted secret); the
service and its clients (serving.score, the Locust users) read it the same way. With a token, every request
but the health probes and the API's description needs `Authorization: Bearer <token>`: the front checks it
before it reads the body, compares it in constant time, and never logs it. TLS is the job of the proxy or the
ingress in front.
"""
import hmac
import os
from pathlib import Path

# Open without the token: health probes (orchestrators have no token), the API's description (the Swagger UI
# and its assets, the OpenAPI document) and the web page with its assets (it asks for the token): no data in
# them. /metrics and everything else need it.
OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/", "/docs.json", "/ui")
OPEN_PREFIXES = ("/static_content/", "/ui/assets/")


class AccessError(Exception):
    pass


def api_token(environ=os.environ):
    """The token, or None when none is set. AccessError when the variables say one but give none."""
    return token_from(environ.get("CIFAR100_API_TOKEN"), environ.get("CIFAR100_API_TOKEN_FILE"))


def token_from(token, path):
    """The token from the values of CIFAR100_API_TOKEN and CIFAR100_API_TOKEN_FILE (None: unset), as api_token."""
    if token is not None and path:
        raise AccessError("set CIFAR100_API_TOKEN or CIFAR100_API_TOKEN_FILE, not both")
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as e:
            raise AccessError(f"CIFAR100_API_TOKEN_FILE={path}: cannot read it ({e.strerror})") from None
    if token is not None and not token.strip():
        raise AccessError("the API token is empty: set a non-empty token or unset the variable")
    return token.strip() if token is not None else None


def open_path(path):
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def refusal(authorization, token):
    """Why a request with this Authorization header (bytes or None) is refused, or None when it may pass."""
    if authorization is None:
        return "this service needs a token: send the header Authorization: Bearer <token>"
    scheme, _, presented = authorization.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return "malformed Authorization header: expected Authorization: Bearer <token>"
    if not hmac.compare_digest(presented.strip().encode(), token.encode()):
        return "the token is not valid for this service"
    return None


def bearer_headers(environ=os.environ):
    """The headers a client sends: {} without a token."""
    token = api_token(environ)
    return {"Authorization": f"Bearer {token}"} if token else {}
