"""The serving process around the engine: bring it up (bootstrap), serve HTTP (app, generate, control,
metrics, worker), its lifecycle, the failover path of a parked shadow (promotion), the memory watch and
discovery announcements.
"""
