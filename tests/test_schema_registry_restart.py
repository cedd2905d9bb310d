"""The registry's state lives in ``_schemas``: a restarted ``streambus serve`` has every
subject, version, id, config, mode and soft deletion it had, and new ids never collide."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.harness import BrokerProcess, free_port, wait_until

pytestmark = pytest.mark.slow


def schema(*fields: str) -> str:
    return json.dumps(
        {"type": "record", "name": "P", "fields": [{"name": f, "type": "int", "default": 0}
                                                    for f in fields]}
    )  # fmt: skip


def state(http: httpx.Client) -> dict[str, object]:
    subjects = http.get("/subjects?deleted=true").json()
    return {
        "subjects": http.get("/subjects").json(),
        "all": subjects,
        "versions": {
            s: [
                http.get(f"/subjects/{s}/versions/{v}?deleted=true").json()
                for v in http.get(f"/subjects/{s}/versions?deleted=true").json()
            ]
            for s in subjects
        },
        "live": {
            s: http.get(f"/subjects/{s}/versions").json() for s in http.get("/subjects").json()
        },
        "config": http.get("/config").json(),
        "subject_config": http.get("/config/orders-value").json(),
        "mode": http.get("/mode/frozen").json(),
    }


def test_restart_keeps_subjects_versions_ids_configs_and_deletions(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    base = f"http://127.0.0.1:{port}"
    with BrokerProcess(data, "--schema-registry-port", str(port)) as proc:
        wait_until(lambda: _up(base))
        with httpx.Client(base_url=base, timeout=30) as http:
            ids = [
                http.post("/subjects/orders-value/versions", json={"schema": schema(*fs)}).json()
                for fs in (("a",), ("a", "b"), ("a", "b", "c"))
            ]
            assert (
                http.post("/subjects/copy-value/versions", json={"schema": schema("a")}).json()
                == ids[0]
            )
            assert http.post(
                "/subjects/gone-value/versions", json={"schema": schema("z")}
            ).is_success
            assert http.put("/config", json={"compatibility": "FULL"}).is_success
            assert http.put("/config/orders-value", json={"compatibility": "NONE"}).is_success
            assert http.put("/mode/frozen", json={"mode": "READONLY"}).is_success
            assert http.delete("/subjects/orders-value/versions/2").json() == 2
            assert http.delete("/subjects/gone-value").json() == [1]
            before = state(http)
        assert proc.stop() == 0

    with BrokerProcess(data, "--schema-registry-port", str(port)) as proc:
        wait_until(lambda: _up(base))
        with httpx.Client(base_url=base, timeout=30) as http:
            assert state(http) == before
            assert before["live"] == {"copy-value": [1], "orders-value": [1, 3]}
            new = http.post("/subjects/orders-value/versions", json={"schema": schema("n")})
            assert new.json()["id"] not in [i["id"] for i in ids]
            assert http.get("/subjects/orders-value/versions").json() == [1, 3, 4]
            after = state(http)
        proc.kill()  # an acknowledged registration survives a crash too

    with BrokerProcess(data, "--schema-registry-port", str(port)):
        wait_until(lambda: _up(base))
        with httpx.Client(base_url=base, timeout=30) as http:
            assert state(http) == after


def _up(base: str) -> bool:
    try:
        return httpx.get(base + "/subjects", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
