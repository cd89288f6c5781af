"""Sealed objects and where they live: the format, the stores, streaming a seal; shared by
every process that seals or reads sealed bytes (crypto, ingest, the gateway, the ops tools)."""
