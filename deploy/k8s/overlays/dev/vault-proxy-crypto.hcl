# Development: plain HTTP to a dev-mode OpenBao in namespace "vault" (no CA). Otherwise as
# base/vault-proxy-crypto.hcl: OpenBao (or Vault) Proxy beside the crypto service: logs in with the pod's Kubernetes service
# account token (audience "vault", short-lived, projected) to the Kubernetes auth role
# "dicomsafe-crypto", keeps the token renewed and re-authenticates when renewal ends.
# The service talks to 127.0.0.1:8100 only; use_auto_auth_token = "force" replaces whatever
# token the service sends with the current auto-auth token, so token expiry never reaches it.
vault {
  address = "http://vault.vault.svc:8200"
  retry {
    num_retries = 5
  }
}

auto_auth {
  method "kubernetes" {
    mount_path = "auth/kubernetes"
    config = {
      role       = "dicomsafe-crypto"
      token_path = "/var/run/secrets/vault/token"
    }
  }

  # The service reads this file once at start (VAULT_TOKEN_FILE); memory-backed emptyDir.
  sink "file" {
    config = {
      path = "/vault/token/token"
      mode = 0440
    }
  }
}

api_proxy {
  use_auto_auth_token = "force"
}

listener "tcp" {
  address     = "127.0.0.1:8100"
  tls_disable = true
}
