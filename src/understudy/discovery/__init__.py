"""How frontends find engines: records with leases, in an embedded registry or in etcd.

records.py       EngineRecord (what an engine says about itself) and the View frontends read
embedded.py      the registry a frontend holds in memory, with its HTTP routes
etcd.py          the same over etcd: keys under a prefix with a lease, watched by frontends
registration.py  the engine's side: register, keep alive, publish state changes, deregister

Engines and frontends both import this package; it imports neither of them.
"""
