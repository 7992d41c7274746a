"""The seed nodes of a Redis Cluster URL: ``redis+cluster://user:pass@host1:6379,host2:6379,host3:6379/0``.

One URL names every seed, comma-separated in its host part, so a URL of one node keeps its meaning and a setting
stays one value (a Secret's ``url`` key). The settings check each seed at start; the store gives them all to the
cluster client, which starts from any one that answers. Plain string work, no redis-py, so both can use it.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def url_nodes(url: str) -> list[str]:
    """The entries of ``url``'s host part, split at commas and stripped (``["host1:6379", "host2:6379"]``; an empty
    entry stays empty). The user info is cut at its last '@' first, so a password may hold commas."""
    return [node.strip() for node in urlsplit(url).netloc.rpartition("@")[2].split(",")]


def node_url(url: str, node: str) -> str:
    """``url`` with ``node`` (``host:port``) as its only host: the same scheme, credentials, database and options."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{node}"))


def seed_urls(url: str) -> list[str]:
    """One URL per node ``url`` lists, in order."""
    return [node_url(url, node) for node in url_nodes(url)]
