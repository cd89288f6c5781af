# Vault/OpenBao policy for the dicomsafe crypto service: the only Vault identity in the
# pipeline. It may create and unwrap data keys and rewrap them under a newer key
# version; it can never read, export, rotate or delete the key itself.
# "dicomsafe-dek" and "transit" are the defaults of CRYPTO_KEY_NAME / VAULT_TRANSIT_MOUNT.

path "transit/datakey/plaintext/dicomsafe-dek" {
  capabilities = ["update"]
}

path "transit/decrypt/dicomsafe-dek" {
  capabilities = ["update"]
}

path "transit/rewrap/dicomsafe-dek" {
  capabilities = ["update"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

path "auth/token/lookup-self" {
  capabilities = ["read"]
}
