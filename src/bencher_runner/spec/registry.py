"""The registry a job names (``config.registry``): ``http(s)://HOST[:PORT]`` or ``HOST[:PORT]``, nothing else.

A job's image always comes from a registry. The server's registry string once reached the image
source unchecked, so an absolute host path there made the daemon open that directory as an OCI
layout. The string is parsed here with the same host grammar as image references (a host name with a
dot, ``localhost``, an IPv4 address or a bracketed IPv6 address; a port of at most 65535), so
anything that could name a path, carry credentials or a query is refused with one line.
"""

import re

from bencher_runner.spec.errors import SpecError

HOST_RE = re.compile(
    r"(?:localhost|\[[0-9a-fA-F:.]+\]|[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*)(?::([0-9]{1,5}))?"
)
MAX_PORT = 65535


def is_registry_host(host: str) -> bool:
    """Whether ``host`` is ``host[:port]`` as a registry may be named: a dotted name, ``localhost``, an
    IP address, or any of these with a port (a bare word like ``layout`` is no host: it could be a
    directory, and image references read it as a repository)."""
    match = HOST_RE.fullmatch(host)
    if match is None:
        return False
    port = match.group(1)
    if port is not None and not 0 < int(port) <= MAX_PORT:
        return False
    return "." in host or ":" in host or host == "localhost" or host.startswith("[")


def parse_registry_url(url: str) -> tuple[str, bool]:
    """``(host[:port], plain_http)`` of a job's registry; SpecError for anything else.

    ``http://`` means plain HTTP, ``https://`` or no scheme TLS; one trailing ``/`` is allowed.
    """
    text = url.strip()
    insecure = False
    if text.startswith("http://"):
        insecure, text = True, text[len("http://") :]
    elif text.startswith("https://"):
        text = text[len("https://") :]
    if text.endswith("/"):
        text = text[:-1]
    if not is_registry_host(text):
        raise SpecError(
            f"config.registry={url!r:.200} is not a registry (expected http(s)://HOST[:PORT] or "
            "HOST[:PORT], e.g. https://registry.bencher.dev); a job's image comes from a registry only, "
            "check the server's registry configuration"
        )
    return text, insecure
