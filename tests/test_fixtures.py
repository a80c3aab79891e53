"""The fixtures themselves work: a real cluster with sample data, a real S3 server."""

from tests.pgcluster import PgCluster


def test_sample_db_has_rows(pg: PgCluster, sample_db: str) -> None:
    counts = pg.row_counts(sample_db)
    assert counts["public.customers"] == 500
    assert counts["public.orders"] == 5000


def test_bucket_is_empty(s3_client, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0
