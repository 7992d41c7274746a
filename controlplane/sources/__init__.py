"""Sources of cluster objects behind one interface: ``kubernetes`` and ``dir:PATH``."""

from __future__ import annotations

from controlplane.settings import ControlPlaneSettings
from controlplane.sources.base import Listing, Source, Stream, WatchEvent


async def open_source(settings: ControlPlaneSettings, *, streams: int = 1) -> Source:
    """``streams``: how many streams will be listed and watched at once."""
    directory = settings.directory
    if directory is not None:
        from controlplane.sources.directory import DirSource

        return DirSource(directory, poll_interval=settings.dir_poll_interval)
    from controlplane.sources.kube import KubeSource

    return await KubeSource.connect(
        kubeconfig=settings.kubeconfig, watch_timeout=settings.watch_timeout, streams=streams
    )


__all__ = ["Listing", "Source", "Stream", "WatchEvent", "open_source"]
