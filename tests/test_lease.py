"""One writer per data_root: the lease on local disk and on a real S3 API server (moto's)."""
from __future__ import annotations

import json
import logging
import os
import threading
import time

import fsspec
import pytest

from tessera.cli import main
from tessera.config.storage import StorageConfig, apply_storage
from tessera.core.lease import LEASE, Lease, LeaseHeld, LeaseLost
from tessera.core.store import ShardStore
from tessera.flows.curate import curate
from tests.s3server import s3_with_credentials


@pytest.fixture(scope="module")
def s3_endpoint():
    with s3_with_credentials() as url:
        yield url


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return ShardStore(str(tmp_path / "data"))
    endpoint = request.getfixturevalue("s3_endpoint")
    apply_storage(StorageConfig(endpoint=endpoint))
    bucket = f"lease-{request.node.name.split('[')[0][-20:].replace('_', '-')}"
    fsspec.filesystem("s3").mkdir(bucket)
    return ShardStore(f"s3://{bucket}/data")


def stale_lease(store: ShardStore, age_s: float) -> dict:
    info = {"owner": "curate", "host": "elsewhere", "pid": 4242, "start": time.time() - age_s,
            "heartbeat": time.time() - age_s, "token": "old"}
    store.write_json(info, LEASE)
    return info


def test_a_second_run_refuses_naming_the_holder_until_the_first_releases(store):
    with Lease(store, "curate demo"):
        held = json.loads(store.fs.cat_file(store.path(LEASE)))
        assert held["owner"] == "curate demo" and held["pid"] == os.getpid() and held["heartbeat"] >= held["start"]
        with pytest.raises(LeaseHeld) as refused:
            Lease(store, "curate other").acquire()
        message = str(refused.value)
        assert "\n" not in message and "curate demo" in message and f"pid {os.getpid()}" in message
    assert not store.exists(LEASE)
    with Lease(store, "curate other"):
        assert json.loads(store.fs.cat_file(store.path(LEASE)))["owner"] == "curate other"


def test_a_waiting_run_takes_the_lease_when_it_is_released(store):
    first = Lease(store, "first").acquire()
    taken = []

    def second():
        with Lease(store, "second", wait=True, poll_s=0.2):
            taken.append(time.monotonic())

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(1.0)
    assert not taken  # still waiting
    released = time.monotonic()
    first.release()
    thread.join(timeout=30)
    assert taken and taken[0] >= released


def test_the_heartbeat_keeps_a_lease_fresh(store):
    with Lease(store, "first", stale_after_s=1.2):
        time.sleep(2.0)  # longer than stale_after_s: only the heartbeat keeps it
        beat = json.loads(store.fs.cat_file(store.path(LEASE)))["heartbeat"]
        assert time.time() - beat < 1.2
        with pytest.raises(LeaseHeld):
            Lease(store, "second", stale_after_s=1.2).acquire()


def test_a_stale_lease_is_taken_over_with_a_warning_and_its_holder_stops(store, caplog):
    old = Lease(store, "old run", stale_after_s=60)
    old.info = stale_lease(store, age_s=120)  # a run whose heartbeat stopped two minutes ago
    with caplog.at_level(logging.WARNING, logger="tessera.core.lease"):
        with Lease(store, "new run", stale_after_s=60):
            assert json.loads(store.fs.cat_file(store.path(LEASE)))["owner"] == "new run"
            old.renew()  # the old run wakes up: it finds the lease taken and stops
            with pytest.raises(LeaseLost, match="new run"):
                old.check()
    assert any("Taking over the lease" in r.getMessage() and "pid 4242" in r.getMessage() for r in caplog.records)


def test_of_two_runs_taking_over_one_stale_lease_one_wins(store):
    stale_lease(store, age_s=600)
    a, b = Lease(store, "a", stale_after_s=60), Lease(store, "b", stale_after_s=60)
    seen_a, seen_b = a._read(), b._read()  # both read the same stale lease
    won = [a._replace(seen_a, a._new_info(), takeover=True), b._replace(seen_b, b._new_info(), takeover=True)]
    assert won == [True, False]
    assert json.loads(store.fs.cat_file(store.path(LEASE)))["owner"] == "a"


def test_the_cli_refuses_in_one_line_while_another_run_writes(tmp_path, capsys):
    store = ShardStore(str(tmp_path / "data"))
    with Lease(store, "curate demo"):
        code = main(["curate", "--config", "configs/demo.yaml", "--set", f"data_root={tmp_path}/data"])
    err = capsys.readouterr().err.strip()
    assert code == 3 and len(err.splitlines()) == 1
    assert "is being written by curate demo" in err and f"pid {os.getpid()}" in err and "--wait" in err


def test_a_refused_curation_leaves_the_holders_resolved_config_alone(tmp_path):
    """The CLI's early check can pass before the first run takes the lease; the flow itself then
    refuses, and must not have replaced the holder's record of what it runs."""
    store = ShardStore(str(tmp_path / "data"))
    store.write_bytes(b"# the holder's config\n", "resolved-config.yaml")
    with Lease(store, "curate demo"), pytest.raises(LeaseHeld, match="curate demo"):
        curate.fn(config="configs/demo.yaml", overrides=[f"data_root={tmp_path}/data"])
    assert store.fs.cat(store.path("resolved-config.yaml")) == b"# the holder's config\n"
