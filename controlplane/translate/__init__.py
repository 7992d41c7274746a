"""Translators: pure functions from cluster objects (plain dicts) to contract records. No I/O, no clock."""
