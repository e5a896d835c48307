"""Memory is given back: after Delta Sampling on/off cycles the DS-off floor returns to its baseline.

A fresh host (nothing else ran in it). The host's own resident memory moves by up to ~0.1 GB from one
generation to the next, so a floor is the lower of two DS-off generations in a row: after one
warm-up generation, the baseline is the lower of the next two; then ten cycles of one DS-on and two
DS-off generations, each giving a floor. The figures go to tests/hosts/artifacts/a1111-memory.txt.
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

    def floor() -> dict[str, int]:
        readings = []
        for _ in range(2):
            host.txt2img(prompt="a fox")
            readings.append(rss_parts(pid))
        return min(readings, key=lambda r: r["VmRSS"])

    host.txt2img(prompt="a fox")  # warm-up: the host's first generation allocates for good
    baseline = floor()
    lines = [f"baseline (DS off): {baseline['VmRSS'] / GIB:.2f} GiB "
             f"(anon {baseline['RssAnon'] / GIB:.2f}, file {baseline['RssFile'] / GIB:.2f})"]
    floors, peaks = [], []
    for cycle in range(10):
        host.txt2img(ds, prompt="a fox")
        peaks.append(rss_parts(pid))
        floors.append(floor())
        lines.append(f"cycle {cycle + 1}: DS on {peaks[-1]['VmRSS'] / GIB:.2f} GiB, "
                     f"DS off {floors[-1]['VmRSS'] / GIB:.2f} GiB (anon {floors[-1]['RssAnon'] / GIB:.2f}, "
                     f"file {floors[-1]['RssFile'] / GIB:.2f})")
    (artifacts / "a1111-memory.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    assert peaks[0]["VmRSS"] > baseline["VmRSS"] + GIB      # the source pair was really loaded
    assert floors[-1]["VmRSS"] <= 1.05 * baseline["VmRSS"], "\n".join(lines)
    # and no creeping: the later cycles' floors sit where the first ones do (a leak of one source load
    # per cycle, or of its fragments, would add gigabytes)
    assert max(f["VmRSS"] for f in floors[5:]) <= max(f["VmRSS"] for f in floors[:5]) + 0.15 * GIB, "\n".join(lines)
