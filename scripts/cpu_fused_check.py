"""CPU torch path vs PyTorch on the issue's CPU case (N=4096, D=512, V=65536, float32, fwd+bwd):
time (median of 3) and peak RSS growth of each provider in its own subprocess.

    PYTHONPATH=src python scripts/cpu_fused_check.py
"""
import json
import subprocess
import sys

CODE = r"""
import resource, time, json, sys, torch, torch.nn.functional as F
torch.manual_seed(0)
n, d, v = 4096, 512, 65536
h = torch.randn(n, d); w = torch.randn(v, d) * d**-0.5; t = torch.randint(0, v, (n,))
import cutce
name = sys.argv[1]
def run():
    a = h.detach().requires_grad_(); c = w.detach().requires_grad_()
    if name == "cutce":
        loss = cutce.linear_cross_entropy(a, c, t)
    elif name == "cutce-recompute":
        loss = cutce.linear_cross_entropy(a, c, t, memory_budget=0)
    elif name == "eager":
        loss = F.cross_entropy(a @ c.T, t)
    elif name == "native-chunked":
        loss = F.linear_cross_entropy(a, c, t, options=torch.nn.LinearCrossEntropyOptions())
    elif name == "native":
        loss = F.linear_cross_entropy(a, c, t)
    loss.backward()
    return loss.item()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss = run()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ts = []
for _ in range(3):
    t0 = time.perf_counter(); run(); ts.append(time.perf_counter() - t0)
print(json.dumps(dict(name=name, s=sorted(ts)[1], mb=(peak - base) / 1024, loss=loss)))
"""

rows = []
for name in sys.argv[1:] or ["cutce", "cutce-recompute", "eager", "native-chunked", "native"]:
    out = subprocess.run([sys.executable, "-c", CODE, name], capture_output=True, text=True)
    if out.returncode:
        print(name, "failed:", out.stderr.strip().splitlines()[-1])
        continue
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    r = rows[-1]
    print(f"| {r['name']} | {r['s']:.2f} s | +{r['mb']:.0f} MB | {r['loss']:.6f} |", flush=True)
