"""A deterministic mesh simulator for aem, in the style of TigerBeetle's
packet simulator and FoundationDB's simulation testing.

One seeded ``random.Random``, one simulated clock (integer microseconds),
one event heap: no trio, no wall clock, no threads, so a run is a function
of its seed and replays bit for bit (``Sim.trace_hash``). The nodes run the
real pure code: the sync sessions of ``protocol/syncsession.py`` (driven by
``tests/sim/drive.py``, the synchronous twin of ``aemd.sync.drive``), the
real ``ledger.store.LogStore`` (in-memory SQLite) or a dict log with the
same rules, the real wire objects (signed ``HostAdvertisement``,
``HeadAnnouncement``), ``aemd.meshview.MeshTable`` and ``RateGate``, and
the real replay for state roots.

Modules:

* ``core``      -- :class:`~tests.sim.core.Sim`: clock, heap, RNG, event and time caps, trace hash.
* ``net``       -- :class:`~tests.sim.net.Network`: connections, ordered streams, gossip; seeded
  delay and jitter, gossip loss, stream resets, partitions, crash and restart.
* ``drive``     -- :class:`~tests.sim.drive.Runner`: pumps a sans-I/O session (Send/Recv/Call).
* ``logs``      -- :class:`~tests.sim.logs.StoreLog` (real store) and :class:`~tests.sim.logs.MemLog`
  (dicts, signature checks memoised across nodes by :class:`~tests.sim.logs.VerifyMemo`).
* ``node``      -- :class:`~tests.sim.node.SimNode`: what ``aemd/node.py`` does with gossip and sync;
  :class:`~tests.sim.node.NodeConfig` its knobs (GossipSub degree D=6, 4..12; intervals; costs).
* ``hostile``   -- misbehaving sync servers and gossip (garbage, forged, wrongnet, flood, silent, heads).
* ``tasks``     -- paid tasks: the real ``host_session`` / ``payer_session`` of protocol/tasksession.py,
  admission facts from the host's replay, reservations, a deterministic fake executor.
* ``mesh``      -- :class:`~tests.sim.mesh.Mesh`: build N nodes, workload of real entries (transfers,
  receipts with acks, double spends, equivocation), ``finish()`` and the invariants.
* ``scenarios`` -- the seeded scenarios ``pytest -m sim`` runs (tests/test_sim.py).
* ``scale``     -- measurements for bench/sim_scale.py.

Replaying a seed (a failing test prints this command)::

    .venv/bin/python -m tests.sim replay --scenario partition --seed 123
    .venv/bin/python -m tests.sim list

Invariants, after every seed (``Mesh.check``), per connected group of live
honest nodes once the mesh is quiet:

* one state root (the real replay, as of one time) and identical frontiers;
* conservation: balances add up to genesis grants + minted - burned;
* no (payer, spend key) charged by two receipts that stand;
* no session, stream, sync mark or task reservation left behind;
* the honest nodes form one group again after the heal and the restarts;
* every host's ad held by every other node of the group;
* an equivocating author frozen at its fork seq on every node, with both
  entries stored (frontier ``(seq, FORK_HEAD)``, ``forks()``, replay ``frozen``).

The API for measurements (``tests/sim/scale.py``)::

    from tests.sim import scale
    mesh = scale.build(1000, seed=1, mix={"host": 0.1, "payer": 0.6, "verifier": 0.05, "relay": 0.25},
                       degree=8, log="mem")       # cfg=NodeConfig(...), latency_ms=, loss=, ...
    scale.settle(mesh, 60)                        # simulated seconds
    scale.measure_ad(mesh, host=scale.mesh_hosts(mesh)[0])   # -> {"time_s", "messages", "bytes", ...}
    scale.measure_burst(mesh, 10_000, per_announce=100)     # -> also "bytes_per_entry_per_node", ...
    scale.churn(mesh, 0.05, over_s=600)           # crash/restart 5% of the nodes meanwhile
    scale.per_node(mesh)                          # sent/received messages and bytes per node, gossip/stream
    scale.author(mesh, node, entry_bytes)         # store any signed entry at a node and announce it

And for a scenario of one's own::

    mesh = Mesh(5, seed=7)                   # log="mem" for the dict log, hostile={2: "garbage"}
    mesh.start()
    mesh.sim.run_until(10)                   # simulated seconds
    mesh.net.partition([[0, 1], [2, 3, 4]])
    mesh.pay(host=0, payer=1, charge=5_000_000)
    mesh.net.crash(3); mesh.sim.run_until(30); mesh.net.restart(3)
    out = mesh.finish()                      # heal, restart, quiet, drain, check
    assert not out.failures, out.failures

Not modelled: NodeCards and learned dials (nodes dial a fixed list of known
peers), GossipSub's IHAVE/IWANT repair (lost gossip is repaired by the next
announcement and by anti-entropy sync), bandwidth limits (a message costs
latency, not size), CPU contention (an insert costs ``verify_us`` per entry
of simulated time, a task's execution 200 ms, nothing else costs time), the
payer's retry on a next host and its disputes. The node logic is a mirror
of ``aemd/node.py`` (named method by method in ``node.py``), not the daemon
itself on a simulated transport: the sessions are the daemon's, the glue is
copied.
"""
