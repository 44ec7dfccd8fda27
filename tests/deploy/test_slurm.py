"""deploy/slurm/understudy.sbatch on a real one-node Slurm (munged, slurmctld, slurmd on 127.0.0.1, started
here): the job serves through its frontend, the active engine's SIGKILL is answered by the shadow (the
official openai client sees one uninterrupted, identical stream), and scancel drains: a stream in flight
when the job is cancelled ends complete, then every process of the job is gone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.deploy import slurm_cluster
from tests.deploy.cli_flags import invocations, shell_words, unknown_flags
from tests.helpers.frontend import wait_until
from tests.helpers.procs import free_port, gone, two_free_ports
from tests.helpers.tiny_model import make_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "slurm" / "understudy.sbatch"


def test_sbatch_uses_only_flags_that_help_lists():
    words = shell_words(SCRIPT.read_text().replace("$UNDERSTUDY ", "understudy "))
    assert [cmd for cmd, _ in invocations(words)] == ["frontend", "up", "serve"]
    assert unknown_flags(words) == []


@pytest.fixture(scope="module")
def slurm():
    why = slurm_cluster.missing()
    if why is not None and os.geteuid() != 0:
        pytest.skip(why)  # CI runs as root with the packages installed (.ci/run): there it must run
    assert why is None, why
    cluster = slurm_cluster.SlurmCluster().start()
    yield cluster
    cluster.stop()


def test_sbatch_serves_fails_over_and_drains_on_scancel(slurm, tmp_path):
    model = make_tiny_llama(tmp_path / "tiny")
    port, fport = two_free_ports(), free_port()
    out = tmp_path / "job.out"
    env = {"UNDERSTUDY": str(Path(sys.executable).with_name("understudy")), "UNDERSTUDY_BACKEND": "host",
           "UNDERSTUDY_PORT": str(port), "UNDERSTUDY_FRONTEND_PORT": str(fport), "UNDERSTUDY_UP_ARGS": "--shadows 1",
           "UNDERSTUDY_SERVE_ARGS": f"--model {model} --kv-cache-memory 16MiB --max-model-len 512 "
                                    "--registration-ttl 2",
           "UNDERSTUDY_FRONTEND_ARGS": f"--model {model}", "OMP_NUM_THREADS": "1"}
    job = slurm.run("sbatch", "--parsable", f"--output={out}", str(SCRIPT), env=env).stdout.strip()
    http = httpx.Client(base_url=f"http://127.0.0.1:{fport}", timeout=30)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{fport}/v1", api_key="-", max_retries=0, timeout=60)

    def log() -> str:
        return out.read_text() if out.exists() else ""

    def engines() -> dict[str, dict]:
        assert slurm.job_state(job) in ("PENDING", "RUNNING"), f"job {job} ended:\n{log()[-4000:]}"
        try:
            r = http.get("/health")
        except httpx.HTTPError:
            return {}
        return {e["status"]: e for e in r.json()["engines"]} if r.status_code == 200 else {}

    pids: list[int] = []
    try:
        view = wait_until(lambda: (v := engines()) and set(v) == {"ACTIVE", "STANDBY"} and v,
                          "the job's frontend to see the active engine and its shadow", 150, every=0.2)
        pids = [e["pid"] for e in view.values()]
        assert view["ACTIVE"]["node"] == view["STANDBY"]["node"]
        model_id = client.models.list().data[0].id
        kw = dict(model=model_id, prompt="Slurm says", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
        reference = client.completions.create(**kw).choices[0].text

        # SIGKILL the active engine mid-stream: the shadow takes over, the stream goes on through the frontend.
        stream = client.completions.create(**kw, stream=True)
        got = [next(stream).choices[0].text for _ in range(3)]
        os.kill(view["ACTIVE"]["pid"], signal.SIGKILL)
        got += [c.choices[0].text for c in stream]
        assert "".join(got) == reference
        after = wait_until(lambda: (v := engines()).get("ACTIVE", {}).get("pid") == view["STANDBY"]["pid"] and v,
                           "the shadow to be the active engine", 60, every=0.2)
        assert client.completions.create(**kw).choices[0].text == reference  # served by the promoted shadow

        # scancel while a stream is in flight: every process drains, the stream ends complete.
        long = client.completions.create(**{**kw, "max_tokens": 200}, stream=True)
        chunks = [next(long)]
        slurm.run("scancel", job)
        chunks += list(long)
        assert sum(len(c.choices[0].text) for c in chunks) > 0 and chunks[-1].choices[0].finish_reason == "length"
        wait_until(lambda: slurm.job_state(job) is None, "the job to leave the queue", 60, every=0.2)
        pids += [e["pid"] for e in after.values()]
        assert all(gone(p) for p in pids)
        records = [json.loads(line) for line in log().splitlines() if line.startswith("{")]
        drained = [r for r in records if r.get("event") == "state" and r.get("new") == "DRAINING"]
        assert drained, log()[-4000:]
        assert any(r.get("event") == "node_stopped" for r in records)
        assert any(r.get("event") == "migrating" and r.get("same_node") for r in records)
    finally:
        if slurm.job_state(job) is not None:
            slurm.run("scancel", "--signal=KILL", job, check=False)
        for p in pids:
            if not gone(p):
                os.kill(p, signal.SIGKILL)
        http.close()
        client.close()
        shutil.rmtree(f"/tmp/understudy-job{job}", ignore_errors=True)  # the job's socket directory
