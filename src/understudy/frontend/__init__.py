"""The OpenAI-compatible frontend: tokenises, routes token requests to engines found through
discovery, migrates broken streams, cancels abandoned work, sheds load, reports health and metrics.

options.py    `understudy frontend` flags (no heavy imports: --help stays instant)
pool.py       what the frontend knows of each engine (record + polled health + its own counts)
router.py     which engine takes a request; busy thresholds (changeable at run time)
health.py     polling engines' /health, canary requests to idle engines
migration.py  one request's token stream across engines: resend prompt + tokens so far on failure
metrics.py    Prometheus metrics (a registry per app)
service.py    the Frontend: what the routes share (pool, router, metrics, HTTP client, tokenizer)
app.py        the FastAPI app's skeleton: /health, /live, /v1/models, /metrics, error handling
generate.py   the OpenAI routes: /v1/completions, /v1/chat/completions
admin.py      run-time thresholds (/admin/thresholds) and the embedded registry's routes
launch.py     from flags to a running server; SIGTERM drains
"""
