"""What the tests share, in one place; import as `from tests.helpers.procs import ServerProcess`.

    procs       real processes: a memory server, `understudy serve`, actors; free_port
    actors      client processes the memory tests start and kill (run as a script by procs.actor)
    streams     requests to an engine's token endpoint, as the failover tests make them
    engine      tiny transformers models and a greedy loop over the paged-KV forward
    frontend    engines, frontends and etcd as processes, and a stub engine in-process
    tiny_model  a tiny random Llama checkpoint whose heads divide by 2 (TP tests, bench/)

pytest finds them because tests/ is a package (the repository root goes on sys.path); bench
scripts get the same root from bench/common.py.
"""
