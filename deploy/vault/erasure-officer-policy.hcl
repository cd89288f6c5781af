# Vault/OpenBao policy for the data-protection officer's erasure tool (GDPR art. 17):
# compute a patient's pseudonymous key reference and destroy that patient's erasure key.
# Nothing else: no reading of keys, no data access.

path "transit/hmac/dicomsafe-pseudonym" {
  capabilities = ["update"]
}

path "dicomsafe-erasure/metadata/*" {
  capabilities = ["delete"]
}
