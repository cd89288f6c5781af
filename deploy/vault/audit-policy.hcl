# Vault/OpenBao policy for the dicomsafe audit service: sign checkpoints of the audit hash
# chains with a non-exportable ed25519 key, and read that key's public halves to verify them.
# Nothing else: no data keys, no secrets.

path "transit/sign/dicomsafe-audit-checkpoint" {
  capabilities = ["update"]
}

path "transit/keys/dicomsafe-audit-checkpoint" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

path "auth/token/lookup-self" {
  capabilities = ["read"]
}
