"""audit: the immutable, hash-chained audit trail in MongoDB, with verification and queries."""
