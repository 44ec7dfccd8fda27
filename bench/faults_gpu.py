"""The fail-fast paths of engine/serving/faults.py on a GPU: a tiny random Llama (CUDA graphs, Triton attention)
on one device's memory service, fault injection by signals (UNDERSTUDY_FAULT_INJECTION=1).

    1. SIGUSR1 mid-stream on the primary: exit 5; lock released, exit and the shadow's ACTIVE timed from the
       fault; the stream resumed on the shadow equals the undisturbed output;
    2. SIGURG on the new active engine (--step-timeout 4): /live 503 at 2 s, a queued request 503, exit 6;
    3. SIGUSR2: a marked 503, exit 7, the fault marker; the next shadow refuses (exit 7), so does a new engine.

    python bench/faults_gpu.py       # from the repository root, on a machine with a GPU (docs/logs/gpu_faults_h200.log)
"""
import json, os, signal, subprocess, sys, time, tempfile, threading
from pathlib import Path
import httpx
from understudy.common.auth import admin_headers

ADMIN = admin_headers()  # /engine/generate needs the node's admin token
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "src")]
os.environ["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "src"), ROOT, os.environ.get("PYTHONPATH", "")])
from tests.helpers.tiny_model import make_tiny_llama

D = Path(tempfile.mkdtemp(prefix="usg-", dir="/tmp"))
model = make_tiny_llama(D / "model")
env = {**os.environ, "UNDERSTUDY_FAULT_INJECTION": "1", "PYTHONUNBUFFERED": "1"}
procs = []

class P:
    def __init__(self, argv):
        self.p = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        procs.append(self.p); self.lines = []
        threading.Thread(target=self.pump, daemon=True).start()
    def pump(self):
        for l in self.p.stderr:
            self.lines.append(l.rstrip())
    def ev(self, name, **kw):
        for l in list(self.lines):
            try: e = json.loads(l)
            except ValueError: continue
            if e.get("event") == name and all(e.get(k) == v for k, v in kw.items()): return e
    def wait(self, name, timeout=300, **kw):
        t = time.monotonic()
        while time.monotonic() - t < timeout:
            e = self.ev(name, **kw)
            if e: return e
            if self.p.poll() is not None and not self.ev(name, **kw):
                time.sleep(0.2)
                if (e := self.ev(name, **kw)): return e
                raise SystemExit(f"exited {self.p.returncode} before {name}:\n" + "\n".join(self.lines[-20:]))
            time.sleep(0.02)
        raise SystemExit(f"timeout {name}:\n" + "\n".join(self.lines[-20:]))

mem = P([sys.executable, "-m", "understudy", "memory-server", "--backend", "cuda", "--device", "0", "--socket-dir", str(D)])
mem.wait("listening")
port = [18200]
def engine(role, *extra):
    port[0] += 1
    e = P([sys.executable, "-m", "understudy", "serve", "--backend", "cuda", "--model", str(model), "--memory-service",
           "connect", "--socket-dir", str(D), "--port", str(port[0]), "--kv-cache-memory", "1GiB", "--max-model-len",
           "1024", "--no-progress", "--role", role, *extra])
    e.url = f"http://127.0.0.1:{port[0]}"
    return e

body = lambda n: {"token_ids": [1, 2, 3, 4, 5], "sampling": {"max_tokens": n, "temperature": 0, "ignore_eos": True}}
a = engine("primary", "--step-timeout", "4")
ready = a.wait("engine_ready"); a.wait("serving")
print("engine_ready:", {k: ready[k] for k in ("seconds", "step_timeout_s", "live_bound_s", "slowest_warm_up_step_s")})
s1 = engine("shadow", "--step-timeout", "4"); s1.wait("waiting_for_failover_lock")
print("shadow ready:", {k: s1.ev("engine_ready")[k] for k in ("step_timeout_s", "live_bound_s", "slowest_warm_up_step_s")})
ref = httpx.post(f"{a.url}/engine/generate", headers=ADMIN, json=body(300), timeout=60).text.splitlines()
ref = [t for l in ref for t in json.loads(l)["token_ids"]]

# 1. step error mid-stream
got = []
def stream():
    with httpx.stream("POST", f"{a.url}/engine/generate", headers=ADMIN, json=body(300), timeout=60) as r:
        for l in r.iter_lines():
            if l: got.extend(json.loads(l)["token_ids"])
t = threading.Thread(target=stream); t.start()
while len(got) < 20: time.sleep(0.001)
a.p.send_signal(signal.SIGUSR1)
t.join()
print("1. exit", a.p.wait(30), "tokens before", len(got), "failed:", a.wait("engine_failed")["reason"][:80])
inj, ex = a.wait("fault_injected")["ts"], a.wait("exiting")["ts"]
act = s1.wait("state", new="ACTIVE")
print(f"   fault -> lock released {a.wait('failover_lock_released')['after_s']} s, exit logged {ex - inj:.4f} s, shadow ACTIVE {act['ts'] - inj:.4f} s (switch {act['switch_s']})")
rest = httpx.post(f"{s1.url}/engine/generate", headers=ADMIN, json={**body(300 - len(got)), "token_ids": [1, 2, 3, 4, 5] + got}, timeout=60).text.splitlines()
rest = [tok for l in rest for tok in json.loads(l)["token_ids"]]
print("   resumed output identical:", got + rest == ref)

# 2. hang -> /live 503 -> watchdog
s2 = engine("shadow"); s2.wait("waiting_for_failover_lock")
s1.p.send_signal(signal.SIGURG); s1.wait("fault_armed")
th = threading.Thread(target=lambda: print("   queued request:", httpx.post(f"{s1.url}/engine/generate", headers=ADMIN, json=body(4), timeout=60).status_code)); th.start()
s1.wait("fault_injected"); t0 = time.monotonic(); stuck = None
while stuck is None:
    r = httpx.get(f"{s1.url}/live", timeout=5)
    if r.status_code == 503: stuck = r.json()
    time.sleep(0.05)
print(f"2. /live 503 after {time.monotonic() - t0:.2f} s:", stuck)
print("   exit", s1.p.wait(30), s1.wait("engine_failed")["reason"]); th.join()
print("   next shadow:", s2.wait("state", new="ACTIVE")["new"])

# 3. device fault -> marker -> the next shadow refuses
s3 = engine("shadow"); s3.wait("waiting_for_failover_lock")
s2.p.send_signal(signal.SIGUSR2); s2.wait("fault_armed")
r = httpx.post(f"{s2.url}/engine/generate", headers=ADMIN, json=body(4), timeout=60)
print("3. request:", r.status_code, r.headers.get("x-understudy-failure"), "exit", s2.p.wait(30))
print("   marker:", next(D.glob("device-*.fault")).read_text().strip()[:200])
print("   shadow:", s3.wait("state", new="DEAD")["reason"], "exit", s3.p.wait(30))
late = engine("shadow"); print("   late engine exit", late.p.wait(120), [l for l in late.lines if "remove" in l][:1])
for p in procs:
    if p.poll() is None: p.kill()
