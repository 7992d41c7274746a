"""maas-gateway data path: the contract, stores, limits, the ext_authz service and the meter."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("maas-gateway")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installing
    __version__ = "0.0.0"
