"""Snapshot and restore of engines: cuda-checkpoint + CRIU, with the weights left in the memory service.

identity.py         the 16-hex identity of an engine configuration (what an image can stand in for)
manifest.py         manifest.json: phases Pending -> Creating -> Ready | Failed, atomic writes, listing
criu.py             criu dump / restore of an engine process and the flags it needs
cuda_checkpoint.py  cuCheckpointProcess* through cuda.bindings (a no-op for processes without CUDA)
checkpoint.py       quiesce -> CUDA checkpoint -> CRIU dump -> resume; a failure leaves the engine serving
restore.py          CRIU restore -> CUDA restore -> resume (reconnect, remap the weights, park)
options.py, commands.py  `understudy snapshot checkpoint | restore | list`
The engine's side (quiesce / resume) is engine/serving/control.py.
"""
