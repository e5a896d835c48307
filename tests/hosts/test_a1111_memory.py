"""Memory is given back: after Delta Sampling on/off cycles the DS-off floor returns to its baseline.

A fresh host (nothing else ran in it): two DS-off generations set the baseline, then ten cycles of
one DS-on and one DS-off generation; the resident memory after each DS-off generation is the floor.
The figures are written to tests/hosts/artifacts/a1111-memory.txt.
"""

from __future__ import annotations

from pathlib import Path

from models import LORA, SOURCE, TARGET

GIB = 2 ** 30


def rss_parts(pid: int) -> dict[str, int]:
    parts = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            parts[key] = int(value.split()[0]) * 1024
    return parts


def test_memory_floor_returns_after_ten_on_off_cycles(hosts, artifacts):
    host = hosts.get("sd15-memory", TARGET, fresh=True)
    ds = {"source_checkpoint": SOURCE, "adapters": f"<lora:{LORA}:1>", "scale": 2.0}
    pid = host.process.pid
    for _ in range(2):
        host.txt2img(prompt="a fox")
    baseline = rss_parts(pid)
    lines = [f"baseline (DS off): {baseline['VmRSS'] / GIB:.2f} GiB "
             f"(anon {baseline['RssAnon'] / GIB:.2f}, file {baseline['RssFile'] / GIB:.2f})"]
    floors, peaks = [], []
    for cycle in range(10):
        host.txt2img(ds, prompt="a fox")
        peaks.append(rss_parts(pid))
        host.txt2img(prompt="a fox")
        floors.append(rss_parts(pid))
        lines.append(f"cycle {cycle + 1}: DS on {peaks[-1]['VmRSS'] / GIB:.2f} GiB, "
                     f"DS off {floors[-1]['VmRSS'] / GIB:.2f} GiB (anon {floors[-1]['RssAnon'] / GIB:.2f}, "
                     f"file {floors[-1]['RssFile'] / GIB:.2f})")
    (artifacts / "a1111-memory.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    assert peaks[0]["VmRSS"] > baseline["VmRSS"] + GIB      # the source pair was really loaded
    assert floors[-1]["VmRSS"] <= 1.05 * baseline["VmRSS"], "\n".join(lines)
    assert max(f["VmRSS"] for f in floors) <= 1.05 * baseline["VmRSS"], "\n".join(lines)
