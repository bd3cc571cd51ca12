"""(device diagnostic) How much of an offloaded run's host -> device copying overlaps its compute, from the
jax.profiler trace `bench_offload --profile DIR` writes; a timeline PNG of the last WINDOW_MS of copying.

    python3 tools/offload_overlap.py TRACE_DIR OUT.png [WINDOW_MS]

Copies are the GPU's memcpy events, and every event on a copy-only stream ("Stream #21(MemcpyH2D)"), that are not
device -> host or device -> device (by event name, or a copy stream's name: a copy whose names give no direction
counts); compute is every other GPU event but memsets, whatever its stream ("Stream #14(Memset,MemcpyD2D,Compute)").
Prints (and writes beside the PNG as JSON) the busy time of each, the share of the copy time during which some kernel
ran, and the span.
"""
import glob
import gzip
import json
import sys


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, merged [start, end) intervals."""
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def length(intervals) -> float:
    return sum(end - start for start, end in intervals)


def intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the overlap of two merged interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


# Names of copies that are not host -> device (lowered, spaces removed), as CUPTI / XLA's tracer may write them.
AWAY_FROM_HOST_TO_DEVICE = ("d2h", "dtoh", "devicetohost", "->pinned", "->pageable", "->host", "d2d", "dtod",
                            "devicetodevice", "device->device", "p2p", "peer")


def trace_events(folder: str) -> list[dict]:
    """The newest trace's events (jax.profiler writes FOLDER/plugins/profile/RUN/HOST.trace.json.gz)."""
    path = sorted(glob.glob(f"{folder}/plugins/profile/*/*.trace.json.gz"))[-1]
    return json.load(gzip.open(path))["traceEvents"]


def process_and_thread_names(events: list[dict]) -> tuple[dict, dict]:
    """({pid: process name}, {(pid, tid): thread name}) from the trace's metadata events."""
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return processes, threads


def event_lines(events: list[dict]) -> list[tuple[str, str, int, list[str]]]:
    """Every (process, thread) that holds complete events, busiest first: (process, thread, count, its first 4
    distinct names)."""
    processes, threads = process_and_thread_names(events)
    counts, names = {}, {}
    for e in events:
        if e.get("ph") == "X":
            line = (e["pid"], e.get("tid"))
            counts[line] = counts.get(line, 0) + 1
            seen = names.setdefault(line, [])
            if len(seen) < 4 and e["name"][:40] not in seen:
                seen.append(e["name"][:40])
    return [(str(processes.get(pid, pid)), str(threads.get((pid, tid), tid)), count, names[(pid, tid)])
            for (pid, tid), count in sorted(counts.items(), key=lambda item: -item[1])]


def gpu_events(events: list[dict]) -> tuple[list, list]:
    """(copies, kernels): [(start_us, end_us, name)] of GPU 0's host -> device memcpys and of everything else."""
    processes, threads = process_and_thread_names(events)
    copies, kernels = [], []
    for e in events:
        if e.get("ph") != "X" or not processes.get(e["pid"], "").startswith("/device:GPU:0"):
            continue
        name = e["name"].lower().replace(" ", "")
        stream = threads.get((e["pid"], e["tid"]), "").lower().replace(" ", "")  # e.g. stream#14(memset,compute)
        copy_stream = "memcpy" in stream and "compute" not in stream and "kernel" not in stream
        span = (e["ts"], e["ts"] + e["dur"], e["name"])
        if "memcpy" in name or "memorycopy" in name or copy_stream:
            label = name + (stream if copy_stream else "")
            if not any(word in label for word in AWAY_FROM_HOST_TO_DEVICE):
                copies.append(span)  # host -> device, or a copy whose direction the names do not say
        elif "memset" not in name:
            kernels.append(span)
    return copies, kernels


def main(folder: str, png: str, window_ms: float = 300.0) -> dict:
    events = trace_events(folder)
    copies, kernels = gpu_events(events)
    if not copies or not kernels:
        for process, thread, count, names in event_lines(events)[:30]:
            print(f"  {process[:40]:40} {thread[:40]:40} {count:7d}  {names}")
        raise SystemExit(f"{folder}: {len(copies)} host -> device copies and {len(kernels)} kernels found on GPU 0 "
                         "(the trace's event lines above)")
    copy_busy, compute_busy = union([c[:2] for c in copies]), union([k[:2] for k in kernels])
    start = min(copy_busy[0][0], compute_busy[0][0])
    end = max(copy_busy[-1][1], compute_busy[-1][1])
    hidden = intersection(copy_busy, compute_busy)
    summary = {"span_ms": (end - start) / 1e3, "copy_busy_ms": length(copy_busy) / 1e3,
               "compute_busy_ms": length(compute_busy) / 1e3, "copy_overlapped_by_compute": hidden / length(copy_busy),
               "copies": len(copies), "kernels": len(kernels)}
    print(f"span {summary['span_ms']:.1f} ms: host->device copies busy {summary['copy_busy_ms']:.1f} ms "
          f"({len(copies)} copies), compute busy {summary['compute_busy_ms']:.1f} ms ({len(kernels)} kernels); "
          f"{summary['copy_overlapped_by_compute']:.1%} of the copy time has a kernel running beside it")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    high = copy_busy[-1][1]  # the last copy's end: after it the run only computes (the last layer, the tokens)
    low = high - window_ms * 1e3
    fig, ax = plt.subplots(figsize=(11, 2.6))
    for row, (busy, colour) in enumerate(((copy_busy, "tab:orange"), (compute_busy, "tab:blue"))):
        shown = [((max(s, low) - low) / 1e3, (min(e, high) - max(s, low)) / 1e3) for s, e in busy
                 if e > low and s < high]
        ax.broken_barh(shown, (row * 10 + 1, 8), facecolors=colour)
    ax.set_yticks([5, 15], ["host -> device copies", "compute kernels"])
    ax.set_xlabel(f"ms (the last {window_ms:g} ms of copying)")
    ax.set_title(f"offloaded decoding: {summary['copy_overlapped_by_compute']:.0%} of the copy time overlaps compute")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    with open(png.rsplit(".", 1)[0] + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {png}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(float(a) for a in sys.argv[3:4]))
