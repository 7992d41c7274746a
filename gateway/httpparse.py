"""Feeding bytes to an httptools request parser, shared by the lean HTTP/1.1 servers (the authz check port, the
meter's proxy port): an ``Upgrade`` header (h2c, websocket) is ignored, the request answered in HTTP/1.1 and parsing
goes on after it with a fresh parser; anything else the parser refuses is handed back to the caller to answer."""

from __future__ import annotations

from typing import Protocol

import httptools


class Parsing(Protocol):
    _parser: httptools.HttpRequestParser


def feed(owner: Parsing, data: bytes) -> BaseException | None:
    """Parse ``data`` with ``owner._parser`` (its callbacks run meanwhile); None when it parsed, else what stopped
    it: the exception a callback raised, or the parser's own error. The caller drops it once answered: its traceback
    holds the frames that led to it, the caller's among them."""
    while data:
        try:
            owner._parser.feed_data(data)
            return None
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            owner._parser = httptools.HttpRequestParser(owner)
            data = data[offset:]
        except httptools.HttpParserCallbackError as exc:
            return exc.__context__ or exc
        except httptools.HttpParserError as exc:
            return exc
    return None
