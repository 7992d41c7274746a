"""maas-gateway control plane: sources, translators, sync, leader election, the admin API and the CLI."""
