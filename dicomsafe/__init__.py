"""dicomsafe: shared plumbing (``dicomsafe.common``) and generated contracts (``dicomsafe.v1``)."""
