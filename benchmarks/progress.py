"""What the live view costs: 20,000 tiny thread tasks with the view on and off.

The runs happen inside a real Jupyter kernel (started here with jupyter_client), so the
widget's messages really travel over the kernel's iopub channel. Three variants:
``progress="none"``; ``"auto"``, the default, where a blocking run shows its view once
it has lasted half a second (these runs end sooner, so what is measured is the check);
and ``"widget"``, which shows the view at once, so its whole fixed cost is measured,
with the summary and the timeline it leaves once the run has ended. Each is timed as
the best of 5, alternating, on one warm executor. The timeline of the run's 20,000
records is also timed alone: it is drawn after the run, so the run itself pays nothing
for it while it executes. Run it from the
repository root::

    python benchmarks/progress.py
"""

from __future__ import annotations

import json
import queue

from jupyter_client.manager import start_new_kernel

TASKS = 20_000
REPEATS = 5
CODE = f"""
import json, time
import cellpool

executor = cellpool.Executor("thread", 8)
executor.run(lambda x: x + 1, range({TASKS}), progress="none")
best = {{"none": float("inf"), "auto": float("inf"), "widget": float("inf")}}
for _ in range({REPEATS}):
    for progress in best:
        started = time.perf_counter()
        executor.run(lambda x: x + 1, range({TASKS}), progress=progress)
        best[progress] = min(best[progress], time.perf_counter() - started)
results = executor.run(lambda x: x + 1, range({TASKS}), progress="none")
started = time.perf_counter()
results.timeline()
best["timeline alone"] = time.perf_counter() - started
executor.shutdown()
print("RESULT", json.dumps(best))
"""


def measure() -> dict[str, float]:
    """Run ``CODE`` in a fresh kernel and return what it printed."""
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        msg_id = client.execute(CODE)
        while True:
            try:
                msg = client.get_iopub_msg(timeout=300)
            except queue.Empty:
                raise RuntimeError("the kernel stopped answering") from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "error":
                raise RuntimeError("\n".join(msg["content"]["traceback"]))
            if msg["msg_type"] == "stream" and "RESULT" in msg["content"]["text"]:
                return json.loads(msg["content"]["text"].split("RESULT", 1)[1])
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def main() -> None:
    best = measure()
    print(f"{TASKS:,} x + 1 on 8 threads in a kernel, best of {REPEATS}")
    print("| progress | wall s | ratio |\n| --- | --- | --- |")
    for progress, seconds in best.items():
        print(f"| {progress} | {seconds:.3f} | {seconds / best['none']:.2f}x |")
    ratio = best["auto"] / best["none"]
    verdict = "PASS" if ratio < 1.05 else "FAIL"
    print(f"target: the default progress costs under 5%: {verdict} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
