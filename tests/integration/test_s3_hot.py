"""Hot replicas on S3 buckets (``[[hot.s3]]``) against a real SeaweedFS: what a cluster shares.

A ``vna serve`` with one shared-directory replica and two S3 bucket replicas
(W = 3) ingests over DIMSE and gRPC; every copy lands in every bucket,
retrieves are bit-exact, a second front-end on the same index and stores
serves what the first one stored, and a replica without a bucket is a
configuration error.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any, Callable

from pydicom import dcmread

from tests.conftest import VnaServer, dataset_bytes, free_port
from tests.integration import scu
from vna.api.client import VnaClient
from vna.config import S3Config
from vna.storage.s3 import S3BlobStore

Factory = Callable[..., VnaServer]
TOKEN = "cluster-write-token-0123456789"


def s3_table(cfg: S3Config) -> str:
    return (f'[[hot.s3]]\nendpoint_url = "{cfg.endpoint_url}"\nbucket = "{cfg.bucket}"\n'
            f'access_key = "{cfg.access_key}"\nsecret_key = "{cfg.secret_key}"\nmax_attempts = 2\n')


def test_ingest_and_retrieve_with_s3_hot_replicas(make_server: Factory, corpus: list[Path], s3_config: S3Config,
                                                   s3_boto_session: Any, tmp_path: Path) -> None:
    second = S3Config(**{**s3_config.__dict__, "bucket": f"vna-test-{uuid.uuid4().hex[:12]}"})
    admin2 = S3BlobStore("s3-admin-2", second, session=s3_boto_session)
    assert admin2.create_bucket_if_missing()
    shared = tmp_path / "shared-hot"
    try:
        grpc_port = free_port()
        config = (f'[hot]\nreplicas = ["{shared}"]\n{s3_table(s3_config)}{s3_table(second)}'
                  f'[grpc]\nenabled = true\nhost = "127.0.0.1"\nport = {grpc_port}\n'
                  f'[[grpc.token]]\nname = "w"\ntoken = "{TOKEN}"\nrole = "write"\n')
        srv = make_server(config)
        via_dimse, via_grpc = corpus[:3], corpus[3:6]
        assert [r.Status for r in scu.store(srv.port, via_dimse)] == [0, 0, 0]
        with VnaClient(f"127.0.0.1:{grpc_port}", TOKEN, timeout=60) as c:
            for p in via_grpc:
                assert c.store(p).missing_replicas == ()
            for p in via_grpc:
                (inst,) = c.retrieve(sop_uid=str(dcmread(p, stop_before_pixels=True).SOPInstanceUID))
                assert inst.data == p.read_bytes()

        # every instance is a blob in both buckets and the shared directory, recorded OK on all three
        stats = json.loads(srv.cli("index", "stats", "--json").stdout)
        assert stats["instances"] == 6
        for bucket_cfg in (s3_config, second):
            store = S3BlobStore("check", bucket_cfg, session=s3_boto_session)
            assert len([k for k in store.iter_keys("") if not k.startswith("quarantine/")]) == 6
        assert len([p for p in shared.rglob("*") if p.is_file() and ".tmp" not in p.parts]) == 6
        assert stats["tiers"]["hot"]["placements"] == 18 and stats["tiers"]["hot"]["by_state"] == {"OK": 18}

        # a second front-end on the same index, directory and buckets serves what the first stored
        srv.stop()
        srv2 = make_server(config.replace(f"port = {grpc_port}", f"port = {free_port()}"), start=False)
        srv2.data_dir = srv.data_dir  # same SQLite index (a cluster shares Cassandra instead)
        srv2.start()
        for p in via_dimse:
            ds = dcmread(p, stop_before_pixels=True)
            _, final, raw = scu.get(srv2.port, {"QueryRetrieveLevel": "IMAGE",
                                                "StudyInstanceUID": str(ds.StudyInstanceUID),
                                                "SeriesInstanceUID": str(ds.SeriesInstanceUID),
                                                "SOPInstanceUID": str(ds.SOPInstanceUID)},
                                    [str(ds.SOPClassUID)])
            assert final.Status == 0
            assert hashlib.sha256(raw[str(ds.SOPInstanceUID)]).digest() == \
                hashlib.sha256(dataset_bytes(p)).digest()
    finally:
        admin2._s3.delete_bucket(Bucket=second.bucket)


def test_s3_hot_replica_without_bucket_is_a_config_error(make_server: Factory) -> None:
    srv = make_server('[[hot.s3]]\nendpoint_url = "http://127.0.0.1:1"\n', start=False)
    r = srv.cli("config", "show")
    assert r.returncode == 2 and "hot.s3[0].bucket is required" in r.stderr
