"""gateway: the only door to plaintext for users — authorise (authz), decrypt (crypto), audit.

This first slice speaks gRPC (RetrievalService); the DICOMweb front (STOW/WADO/QIDO over
TLS 1.3) grows here.
"""
