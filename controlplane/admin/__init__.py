"""The quota admin API and the key holders' self-service API, served on the control plane's main port.

Writes go to the source (Secrets and ConfigMaps: etcd, or the manifest directory) and reach Redis through the normal
sync path; reads come from an in-memory view that follows Redis (``state.AdminState``), so every replica can serve.
"""
