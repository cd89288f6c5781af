# Vault/OpenBao policy for the dicomsafe crypto service: the only Vault identity in the
# pipeline. It may wrap data keys it generates (encrypt) and unwrap them, rewrap them under a
# newer key version, read the key's version numbers and rotate it; it can never export,
# reconfigure or delete the key.
# "dicomsafe-dek" and "transit" are the defaults of CRYPTO_KEY_NAME / VAULT_TRANSIT_MOUNT.

# Wrapping: the service generates each data key itself and has Vault encrypt it (many keys per
# request). It sees every data key in plaintext anyway, so encrypting chosen bytes under the
# key grants nothing beyond what decrypt already gives; datakey/plaintext is not needed.
path "transit/encrypt/dicomsafe-dek" {
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

# Key status (versions only; Transit never returns key material on this path) and rotation
# (a new version for new objects). Raising min_decryption_version stays an admin action:
# the config endpoint could also make the key exportable.
path "transit/keys/dicomsafe-dek" {
  capabilities = ["read"]
}

path "transit/keys/dicomsafe-dek/rotate" {
  capabilities = ["update"]
}

# Per-patient erasure keys (crypto-shredding): a keyed pseudonym names the key, and the service
# may create a patient's key once and read it — never overwrite or destroy it.
path "transit/hmac/dicomsafe-pseudonym" {
  capabilities = ["update"]
}

path "dicomsafe-erasure/data/*" {
  capabilities = ["create", "read"]
}
