from tests.test_faults import proxied_config, load_config, Rule, TRANSIENT_FAULTS, run_job, big_db, proxy
import structlog

async def test_dbg(tmp_path, pg, big_db, pg_password_file, proxy, s3_bucket, s3_client):
    cfg = proxied_config(tmp_path, pg, pg_password_file, big_db, endpoint=proxy.url, bucket=s3_bucket, extra_job='compression = "none"\n', max_attempts=3)
    config = load_config(cfg)
    flaky = proxy.add(Rule(TRANSIENT_FAULTS, probability=0.3))
    with structlog.testing.capture_logs() as events:
        run, metrics = await run_job(config)
    for s in proxy.log(): print("LOG:", s.op, s.query.get("partNumber"), s.fault, s.forwarded, s.status)
    for e in events:
        if e["event"].startswith("stamina"): print("RETRY:", e["caused_by"][:200])
