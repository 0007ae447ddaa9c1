"""Machine recovery points on Azure: a two-disk machine replicated on a fake clock keeps the local replica's
points (latest, hourly at the hour boundaries, application-consistent ones), listed per machine from the
blobs' metadata alone (another client, as another host would), each exporting byte-identical to the
primary at its cut; expired snapshots are deleted; a point only counts once every disk has it; a policy
that cannot fit in a page blob's 100 snapshots is refused in one line."""
from __future__ import annotations

import argparse
import json
import os

import pytest

from replicator.azure import points as mpts
from replicator.azure.azurite import DEV_ACCOUNT
from replicator.azure.export import export_point
from replicator.azure.meta import disk_area
from replicator.disk.vhd import parse_footer
from replicator.cli import points as points_cli
from replicator.errors import UsageError
from replicator.replica.retention import keep_points

from .helpers import KiB, MiB, Primary, new_container, other_client, run, target

H = 3600
T0 = 1_767_225_600                      # 2026-01-01 00:00 UTC


async def cycle(t, disks, point: int, additional: int) -> None:
    """One machine cycle: every disk's stream sent and committed, then the checkpoint on each disk."""
    for p in disks:
        sid, path = p.initial() if p.generation == 0 else p.cycle(writes=4, zeros=1, trims=1, max_len=64 * KiB)
        await t.send(p.disk_id, sid, path)
        await t.commit(p.disk_id, sid)
    for p in disks:
        await t.checkpoint(p.disk_id, p.generation, point, False, additional)


def test_machine_points_hourly_and_application_on_a_fake_clock(azurite, tmp_path, capsys):
    async def go():
        c = await new_container(azurite)
        t = target(c, retention=3)
        now = [T0]
        a = Primary(tmp_path, 3 * MiB, seed=31)
        b = Primary(tmp_path, 2 * MiB + 1024, seed=32)
        for p, name in ((a, "sys"), (b, "data")):
            p.clock = lambda: now[0]
            p.scatter(6)
            await t.ensure_disk(p.disk_id, p.size, name, "vm1")
        additional, made = 2, []
        for k in range(1, 14):           # every 25 minutes over five hours; app-consistent on even hours
            now[0] = T0 + k * 25 * 60
            app = now[0] % (2 * H) < 25 * 60
            for p in (a, b):
                p.consistency = "application" if app else "crash"
            await cycle(t, (a, b), k, additional)
            made.append((k, now[0], "application" if app else "crash"))

        other = other_client(azurite, c)            # another host: only the container's metadata to go by
        t2 = target(other)
        found = (await mpts.machine_points(t2))["vm1"]
        want = keep_points([(tm, cons) for _, tm, cons in made], additional)
        assert [(mp.point, mp.kind) for mp in found] == [(made[i][0], why) for i, why in sorted(want.items())]
        assert {"latest", "hourly", "app"} == {mp.kind for mp in found}
        for mp in found:
            assert mp.complete and set(mp.disks) == {str(a.disk_id), str(b.disk_id)}
            assert mp.time == made[mp.point - 1][1]
        # expired snapshots are gone: each blob holds exactly the kept points' snapshots
        for p in (a, b):
            snaps = [x async for x in c.list_blobs(name_starts_with=t.blob_name(p.disk_id), include=["snapshots"])
                     if x.snapshot]
            assert len(snaps) == len(found)
        # each point exports byte-identical to the primary at its cut (generation k of both disks)
        for mp in found:
            out = tmp_path / f"point-{mp.point}"
            os.mkdir(out)
            got, paths = await export_point(t2, "vm1", mp.point, str(out))
            assert len(paths) == 2
            assert sorted(os.path.basename(x) for x in paths) == ["data.vhd", "sys.vhd"]
            for p, name in ((a, "sys"), (b, "data")):
                with open(out / f"{name}.vhd", "rb") as f:
                    data = f.read()
                assert data[:p.size] == p.history[mp.point], f"point {mp.point} of {p.disk_id}"
                parse_footer(data[disk_area(p.size):], disk_area(p.size), "export")
        with pytest.raises(UsageError, match="no recovery point 1 "):
            await export_point(t2, "vm1", 1, str(tmp_path))

        # a cycle that reached one disk only is no point yet, and becomes one once the other has it
        now[0] += 25 * 60
        for p in (a, b):
            sid, path = p.cycle(writes=2, zeros=0, trims=0)
            await t.send(p.disk_id, sid, path)
            await t.commit(p.disk_id, sid)
        await t.checkpoint(a.disk_id, a.generation, 14, False, additional)
        assert (await mpts.machine_points(t2, "vm1"))["vm1"][-1].point == 13
        await t.checkpoint(b.disk_id, b.generation, 14, False, additional)
        await t.checkpoint(b.disk_id, b.generation, 14, False, additional)      # repeated: idempotent
        last = (await mpts.machine_points(t2, "vm1"))["vm1"][-1]
        assert last.point == 14 and last.kind == "latest"

        with pytest.raises(UsageError, match="100 snapshots|allows 100"):
            await target(c, retention=60).checkpoint(a.disk_id, a.generation, 14, False, 24)
        await t.close()
        await t2.close()
        await other.close()
        await c.close()
        made.append((14, now[0], "crash"))
        return c.container_name, a, made

    name, a, made = run(go())
    # `replicator points list / export` against the Azure target (what any host with the container sees)
    parser = argparse.ArgumentParser()
    points_cli.register(parser.add_subparsers(dest="area"))
    url = f"azure://{DEV_ACCOUNT}/{name}?endpoint={azurite.account_url}"

    def cli(*argv):
        args = parser.parse_args(["points", *argv])
        assert args.func(args) == 0
        return capsys.readouterr().out
    listed = json.loads(cli("list", "--to", url, "--json"))["vm1"]
    want = keep_points([(tm, cons) for _, tm, cons in made], 2)
    assert [x["point"] for x in listed] == [made[i][0] for i in sorted(want)]
    assert 13 not in [x["point"] for x in listed]                 # 14 took its place as the hour's last
    assert f"point {listed[-1]['point']:>6}" in cli("list", "--to", url)
    out = tmp_path / "cli-export"
    os.mkdir(out)
    assert "exported point 11" in cli("export", "--to", url, "vm1", "--point", "11", "--out", str(out))
    with open(out / "sys.vhd", "rb") as f:
        assert f.read(a.size) == a.history[11]
    with pytest.raises(UsageError, match="either --root"):
        cli("list")



def test_a_policy_beyond_100_snapshots_is_a_settings_error(tmp_path):
    from replicator.orchestration.settings import ConfigError, parse_config
    for name in ("a.vhdx", "b.vhdx"):
        (tmp_path / name).write_bytes(b"")
    text = '''[daemon]
state_dir = "state"
[[machine]]
name = "vm1"
disks = ["a.vhdx", "b.vhdx"]
target = "azure://acct/replicas?retention={retention}"
additional_points = 24
'''
    with pytest.raises(ConfigError) as e:
        parse_config(text.format(retention=60), base_dir=str(tmp_path))
    problems = dict(e.value.problems)
    assert "Azure allows 100" in problems["machine[vm1].target"] and "\n" not in problems["machine[vm1].target"]
    ok = parse_config(text.format(retention=8), base_dir=str(tmp_path))
    assert ok.machines[0].protection.additional_points == 24
