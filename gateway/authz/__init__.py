"""``maas authz``: the Envoy HTTP ext_authz service."""
