"""`make bench` keeps working: each part (but the Orthanc comparison, which needs Debian's
Orthanc and minutes) runs at its smallest size against the test servers and writes
well-formed rows. Nothing here judges a figure: performance is the bench's business, not a
test's; this only catches a bench broken by a change elsewhere (a stale seal request, say)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import Servers

REPO = Path(__file__).resolve().parents[2]
KEYS = {"metric", "value", "unit", "baseline", "ratio", "target", "higher_is_better"}
PARTS = {
    "crypto": (["--rounds", "1", "--sizes-mib", "1"], "crypto_seal_local_1MiB"),
    "store": (["--rounds", "1", "--store-sizes-mib", "1"], "crypto_seal_put_s3_vs_fs_1MiB"),
    "audit": (["--audit-events", "300"], "audit_append_vs_indexed_insert"),
    "authz": (["--authz-checks", "100"], "authz_check_grants_p99"),
}


@pytest.mark.parametrize("part", sorted(PARTS))
def test_each_bench_part_runs_and_writes_its_rows(part: str, servers: Servers, tmp_path: Path) -> None:
    args, expected_metric = PARTS[part]
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP": servers.kafka_bootstrap,
        "MONGODB_URI": servers.mongodb_uri,
        "VAULT_ADDR": servers.vault_addr,
        "VAULT_TOKEN": servers.vault_token,
        "S3_ENDPOINT_URL": servers.s3.endpoint_url,
        "S3_ACCESS_KEY_ID": servers.s3.access_key_id,
        "S3_SECRET_ACCESS_KEY": servers.s3.secret_access_key,
        "S3_REGION": servers.s3.region,
    }
    out = tmp_path / "bench-results.json"
    done = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--only", part, *args, "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert rows and all(set(row) == KEYS for row in rows)
    assert expected_metric in {row["metric"] for row in rows}
    for row in rows:
        assert row["value"] > 0 and row["baseline"] > 0, row
        assert row["ratio"] > 0, row
        if row["baseline"] >= 1:  # small baselines are printed rounded: their quotient drifts
            assert row["ratio"] == pytest.approx(row["value"] / row["baseline"], rel=0.02), row
