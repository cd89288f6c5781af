"""What every DIMSE listener of the product shares: which peers are admitted
(dicomsafe.dimse.peers) and how an association is admitted, audited and bridged to the
service's event loop (dicomsafe.dimse.associations)."""
