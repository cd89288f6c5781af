// Runs once, when the mongo container initialises an empty data volume (docker-entrypoint-initdb.d,
// authenticated as the root user). The authz service's grant store gets its own user with
// readWrite on its own database only. The audit database's insert+find-only user is created by
// `python -m services.audit provision` in the setup job (one definition of that role, in code).
const fs = require("fs");
const password = fs.readFileSync("/run/dicomsafe-secrets/authz-db-password", "utf8").trim();
db.getSiblingDB("dicomsafe_authz").createUser({
  user: "dicomsafe-authz",
  pwd: password,
  roles: [{ role: "readWrite", db: "dicomsafe_authz" }],
});
