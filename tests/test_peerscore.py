"""The pure penalty and ban table (aemd.p2p.peerscore): events and explicit
times in, decisions out; no host, no clock of its own."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from aemd.p2p.peerscore import PeerScore
from protocol.errors import BAD_VALUE, AemError

ROOT = Path(__file__).resolve().parent.parent


def score(**kw) -> PeerScore:
    args = dict(ban_threshold=10.0, ban_seconds=600.0, penalty_half_life=600.0,
                max_tracked_peers=100, ip_ban_after=3)
    args.update(kw)
    return PeerScore(**args)


def test_points_decay_with_the_half_life_and_the_threshold_asks_for_one_ban():
    s = score()
    assert s.penalize("a", 4.0, now=0.0) == (4.0, False)
    assert s.points("a", 600.0) == pytest.approx(2.0)          # one half-life later
    assert s.points("a", 1200.0) == pytest.approx(1.0)
    assert s.penalize("a", 0.0, now=0.0).banned is False       # non-positive points change nothing
    assert s.penalize("a", -5.0, now=0.0).points == pytest.approx(4.0)
    p = s.penalize("a", 6.0, now=0.0)
    assert p.points == pytest.approx(10.0) and p.banned       # at the threshold: ban it
    s.ban("a", now=0.0)
    assert s.penalize("a", 5.0, now=1.0).banned is False      # already banned: not asked again
    assert s.points("never", 0.0) == 0.0


def test_a_ban_holds_until_its_end_and_expired_names_the_ones_to_lift():
    s = score()
    assert s.ban("a", now=100.0) == 700.0                     # default ban_seconds
    assert s.ban("b", now=100.0, seconds=10.0) == 110.0
    assert s.is_banned("a", 699.9) and not s.is_banned("a", 700.0)
    assert sorted(s.banned(105.0)) == ["a", "b"]
    assert s.banned(200.0) == ["a"]
    assert s.next_expiry() == 110.0
    assert s.expired(200.0) == ["b"]
    assert s.has_ban("b")                                     # expired, not yet lifted
    s.lift("b")
    assert not s.has_ban("b") and s.next_expiry() == 700.0
    # A shorter ban does not cut a longer one short.
    assert s.ban("a", now=101.0, seconds=1.0) == 700.0
    s.lift("a")
    assert s.next_expiry() == math.inf


def test_lifting_a_ban_forgets_the_points():
    s = score()
    s.penalize("a", 12.0, now=0.0)
    s.ban("a", now=0.0)
    s.lift("a")
    assert s.points("a", 0.0) == 0.0
    assert s.penalize("a", 1.0, now=0.0) == (1.0, False)


def test_an_address_is_banned_once_enough_distinct_peers_from_it_are():
    s = score(ip_ban_after=3)
    s.ban("p1", now=0.0, seconds=100.0, ip="10.0.0.1")
    s.ban("p2", now=0.0, seconds=200.0, ip="10.0.0.1")
    s.ban("q", now=0.0, ip="10.0.0.2")
    assert not s.ip_banned("10.0.0.1", 1.0)
    s.ban("p3", now=0.0, seconds=300.0, ip="10.0.0.1")
    assert s.ip_banned("10.0.0.1", 1.0)
    assert not s.ip_banned("10.0.0.2", 1.0)
    # The address ban ends when enough of those bans have ended...
    assert not s.ip_banned("10.0.0.1", 150.0)
    # ...and a lifted (expired) ban still counts until its end; an explicit unban does not.
    s2 = score(ip_ban_after=2)
    for p in ("x", "y"):
        s2.ban(p, now=0.0, ip="10.0.0.9")
    s2.lift("x")
    assert s2.ip_banned("10.0.0.9", 1.0)
    s2.unban("x")
    assert not s2.ip_banned("10.0.0.9", 1.0)


def test_address_bans_off_and_without_an_address():
    s = score(ip_ban_after=0)
    for p in ("a", "b", "c", "d"):
        s.ban(p, now=0.0, ip="10.0.0.1")
    assert not s.ip_banned("10.0.0.1", 1.0)
    s = score(ip_ban_after=1)
    s.ban("a", now=0.0)              # address unknown: counts toward none
    assert not s.ip_banned("10.0.0.1", 1.0)


def test_the_points_table_is_bounded_and_keeps_banned_and_worst_peers():
    s = score(max_tracked_peers=10)
    s.ban("banned", now=0.0)
    s.penalize("banned", 0.5, now=0.0)
    for i in range(10):
        s.penalize(f"p{i}", 1.0 + i * 0.1, now=0.0)
    table = s.all_points(0.0)
    assert len(table) <= 10
    assert "banned" in table           # a banned peer's points are never evicted
    assert "p9" in table               # the most penalised stay
    assert "p0" not in table


def test_bad_parameters_are_refused():
    with pytest.raises(AemError) as e:
        score(ban_threshold=0)
    assert e.value.code == BAD_VALUE
    with pytest.raises(AemError):
        score(ip_ban_after=-1)


def test_peerscore_imports_no_trio_and_no_libp2p():
    code = ("import sys\n"
            "for m in ('trio', 'libp2p'): sys.modules[m] = None\n"
            "import importlib.util, pathlib\n"
            "spec = importlib.util.spec_from_file_location('peerscore', 'aemd/p2p/peerscore.py')\n"
            "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
            "print(mod.PeerScore.__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "PeerScore" in r.stdout
