"""The remote tier's address: a Redis server that replicas share, parsed and checked.

``serve --tiers ...,remote=URL`` (LMCache's remote backend) and ``profile --tiers
...,remote=URL`` (which times it) both take ``redis://HOST[:PORT][/DB]`` and fail before
any work starts, naming the URL and the problem, when it is malformed or does not answer.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit

import redis

SCHEMES = ("redis",)  # LMCache 0.5.6's RedisConnector; the one tested here
CHECK_TIMEOUT_S = 3.0
# What LMCache's Redis calls may wait on a server that stopped answering. LMCache 0.5.6
# waits on some without a limit (RemoteBackend.contains: ``future.result()``) and redis-py
# sets none by default: on a frozen server (measured, SIGSTOP) its worker-side lookup and
# its writes then wait until the server answers again, every lookup meanwhile costs the
# scheduler its 3 s lookup timeout, and pending writes hold their chunks' memory.
SOCKET_TIMEOUTS = {"socket_connect_timeout": "2", "socket_timeout": "5"}


class RemoteTierError(ValueError):
    pass


def parse_remote_url(text: str) -> str:
    """``text`` if it is a Redis URL with a host, else RemoteTierError naming what is wrong."""
    try:
        url = urlsplit(text)
        url.port  # noqa: B018 -- raises ValueError on a port that is not a number
    except ValueError as error:
        raise RemoteTierError(f"remote {text!r} is not a URL: {error}") from None
    if url.scheme not in SCHEMES:
        raise RemoteTierError(
            f"remote {text!r} has scheme {url.scheme or '(none)'!r}; the remote tier is a "
            "Redis server: remote=redis://HOST:PORT"
        )
    if not url.hostname:
        raise RemoteTierError(f"remote {text!r} names no host: remote=redis://HOST:PORT")
    return text


def check_remote(url: str, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Raise RemoteTierError unless the Redis server at ``url`` answers a PING."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        client.ping()
    except redis.RedisError as error:
        raise RemoteTierError(f"remote {url} does not answer: {error}") from None
    finally:
        client.close()


def with_timeouts(url: str) -> str:
    """``url`` with redis-py's socket timeouts in its query (``SOCKET_TIMEOUTS``), where
    the user set none: the URL LMCache's ``RedisConnector`` builds its pool from."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    return parts._replace(query=urlencode({**SOCKET_TIMEOUTS, **query})).geturl()
