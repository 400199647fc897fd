"""``ben2q retention apply|clean`` against the real SeaweedFS and a real directory tree.

SeaweedFS (4.x) takes S3 lifecycle configurations (``PutBucketLifecycleConfiguration``)
and answers them back; the tests check the rules as the store keeps them, and that a
refusal (here: a bucket that does not exist) is reported, not hidden. Whether the store
then deletes after N days cannot be observed in a test (rules count whole days).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from stack import ROOT

from ben2q.retention import rule_id

BUCKET = "api-retention"


def retention(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ben2q.cli", "retention", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def bucket(api_stack, s3_server) -> str:
    s3_server.create_bucket(BUCKET)
    return BUCKET


def rules_of(api_stack, bucket: str) -> dict[str, dict]:
    answer = api_stack.s3.get_bucket_lifecycle_configuration(Bucket=bucket)
    return {rule["ID"]: rule for rule in answer["Rules"]}


def test_apply_puts_merged_rules_idempotently(api_stack, bucket):
    api_stack.s3.put_bucket_lifecycle_configuration(
        Bucket=bucket,
        LifecycleConfiguration={
            "Rules": [
                {
                    "ID": "someone-elses",
                    "Filter": {"Prefix": "logs/"},
                    "Status": "Enabled",
                    "Expiration": {"Days": 30},
                }
            ]
        },
    )
    env = {
        **api_stack.env,
        "BEN2Q_API_UPLOAD_LOCATION": f"s3://{bucket}/up/",
        "BEN2Q_API_OUTPUT_LOCATION": f"s3://{bucket}/out",
        "BEN2Q_API_RETENTION": str(86400 + 1),  # a day and a second: 2 days
    }
    first = retention(env, "apply")
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"uploads: s3://{bucket}/up/: objects expire after 2 d" in first.stdout
    assert f"outputs: s3://{bucket}/out/: objects expire after 2 d" in first.stdout
    rules = rules_of(api_stack, bucket)
    assert set(rules) == {"someone-elses", rule_id("up/"), rule_id("out/")}
    assert rules["someone-elses"]["Expiration"] == {"Days": 30}
    for prefix in ("up/", "out/"):
        rule = rules[rule_id(prefix)]
        assert rule["Expiration"] == {"Days": 2} and rule["Status"] == "Enabled"
        assert rule["Filter"] == {"Prefix": prefix}

    again = retention(env, "apply")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("unchanged") == 2
    assert rules_of(api_stack, bucket) == rules

    shorter = retention({**env, "BEN2Q_API_RETENTION": "3600"}, "apply")  # rounds up to 1 day
    assert shorter.returncode == 0, shorter.stdout + shorter.stderr
    rules = rules_of(api_stack, bucket)
    assert len(rules) == 3
    assert rules[rule_id("up/")]["Expiration"] == {"Days": 1}
    assert rules["someone-elses"]["Expiration"] == {"Days": 30}


def test_apply_reports_a_refusal(api_stack):
    env = {
        **api_stack.env,
        "BEN2Q_API_UPLOAD_LOCATION": "s3://no-such-bucket-here/up/",
        "BEN2Q_API_OUTPUT_LOCATION": "file:///nowhere/",
    }
    answer = retention(env, "apply")
    assert answer.returncode == 1
    assert "s3://no-such-bucket-here: lifecycle rules not applied" in answer.stdout
    assert "NoSuchBucket" in answer.stdout and "retention clean --s3" in answer.stdout


def test_apply_without_s3_locations_says_so(api_stack, tmp_path):
    env = {
        **api_stack.env,
        "BEN2Q_API_UPLOAD_LOCATION": (api_stack.root / "x").as_uri() + "/",
        "BEN2Q_API_OUTPUT_LOCATION": (api_stack.root / "y").as_uri() + "/",
    }
    answer = retention(env, "apply")
    assert answer.returncode == 0 and "nothing to apply" in answer.stdout


def test_clean_deletes_old_files_and_empty_directories(api_stack):
    up = api_stack.root / "ret-up"
    out = api_stack.root / "ret-out"
    env = {
        **api_stack.env,
        "BEN2Q_API_UPLOAD_LOCATION": up.as_uri() + "/",
        "BEN2Q_API_OUTPUT_LOCATION": out.as_uri() + "/",
        "BEN2Q_API_RETENTION": "3600",
    }
    old_time = time.time() - 7200
    old = [up / "k1" / "job1" / "0-a.png", out / "k1" / "job1" / "0000-0-a.png"]
    new = [up / "k1" / "job2" / "0-b.png", out / "k2" / "job3" / "0000-0-b.png"]
    for path in [*old, *new]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 10)
    for path in old:
        os.utime(path, (old_time, old_time))
    stale_empty = up / "k9" / "stale"
    stale_empty.mkdir(parents=True)
    fresh_empty = up / "k8" / "fresh"  # an upload may be about to fill it
    fresh_empty.mkdir(parents=True)
    for path in (stale_empty, stale_empty.parent):
        os.utime(path, (old_time, old_time))

    dry = retention(env, "clean", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert all(f"would remove {p.as_uri()}" in dry.stdout for p in old)
    assert all(p.exists() for p in old)

    swept = retention(env, "clean")
    assert swept.returncode == 0, swept.stdout + swept.stderr
    for path in old:
        assert f"removed {path.as_uri()}" in swept.stdout
        assert not path.exists()
    assert all(p.exists() for p in new)
    for gone in (up / "k1" / "job1", out / "k1" / "job1", out / "k1", stale_empty):
        assert not gone.exists() and f"removed directory {gone}" in swept.stdout
    assert fresh_empty.is_dir() and up.is_dir() and out.is_dir()
    assert "removed 2 file(s), 20 bytes" in swept.stdout


def test_clean_sweeps_s3_only_when_asked(api_stack, bucket):
    for key in ("sweep/k/j/0-a.png", "sweep/k/j/0-b.png", "keep/x.png"):
        api_stack.s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    env = {
        **api_stack.env,
        "BEN2Q_API_UPLOAD_LOCATION": f"s3://{bucket}/sweep/",
        "BEN2Q_API_OUTPUT_LOCATION": (api_stack.root / "ret-none").as_uri() + "/",
    }
    skipped = retention(env, "clean")
    assert skipped.returncode == 0 and "skipped" in skipped.stdout
    assert "removed 0 file(s)" in skipped.stdout
    young = retention(env, "clean", "--s3")  # nothing is a day old yet
    assert young.returncode == 0 and "removed 0 file(s)" in young.stdout
    swept = retention(env, "clean", "--s3", "--older-than", "0")
    assert swept.returncode == 0, swept.stdout + swept.stderr
    assert f"removed s3://{bucket}/sweep/k/j/0-a.png" in swept.stdout
    left = api_stack.s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert [obj["Key"] for obj in left] == ["keep/x.png"]
