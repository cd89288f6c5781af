"""Plumbing every dicomsafe service shares: configuration, logging, Kafka and gRPC helpers.

Nothing here knows about one service's internals; services depend on this package and on
the generated contracts in ``dicomsafe.v1``, never on each other.
"""
