#!/usr/bin/env python3
"""Turns the RESULT lines that bench/run collected into bench/results/latest.json and
latest.md, and prints the table. Usage: report.py RAW.jsonl OUT_DIR SECONDS"""

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone


def command(*argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def machine():
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            kib = int(next(l.split()[1] for l in f if l.startswith("MemTotal")))
            mem = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "os": command("sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"),
        "qemu": command("sh", "-c", "qemu-system-x86_64 --version | head -1"),
        "rustc": command("rustc", "--version"),
        "accelerator": "tcg (KVM guests hang on these machines)",
        "commit": command("git", "rev-parse", "--short", "HEAD"),
    }


def fmt(value):
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def main():
    raw, out, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    figures = []
    with open(raw, encoding="utf-8") as f:
        for line in f:
            entry = json.loads(line)
            figures.append({"bench": entry["bench"], **entry["result"]})
    by_name = {f["figure"]: f for f in figures}
    for f in figures:
        source = f.get("baseline_from")
        if source and f.get("baseline") is None and source in by_name:
            f["baseline"] = by_name[source]["value"]
            f["baseline_repetitions"] = by_name[source]["repetitions"]
            f["ratio"] = f["value"] / f["baseline"] if f["baseline"] else None
    report = {
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": seconds,
        "machine": machine(),
        "figures": figures,
    }
    with open(os.path.join(out, "latest.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")

    rows = [
        "| figure | median | min–max | n | baseline | ratio | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for f in figures:
        met = {True: "met", False: "**NOT met**", None: "-"}[f.get("met")]
        baseline = "-"
        if f.get("baseline") is not None:
            baseline = f"{fmt(f['baseline'])} {f['unit']} ({f.get('baseline_name') or 'baseline'})"
        ratio = f"{f['ratio']:.2f}x" if f.get("ratio") is not None else "-"
        rows.append(
            f"| {f['figure']} | {fmt(f['value'])} {f['unit']} | {fmt(f['min'])}–{fmt(f['max'])} "
            f"| {f['repetitions']} | {baseline} | {ratio} | {f.get('goal') or '-'} | {met} |"
        )
        if f.get("note"):
            notes.append(f"- {f['figure']}: {f['note']}")
    m = report["machine"]
    text = "\n".join(
        [
            f"# Benchmark run {report['generated']} ({seconds} s)",
            "",
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}; {m['os']}; kernel {m['kernel']}; "
            f"{m['qemu']}; {m['rustc']}; {m['accelerator']}; commit {m['commit']}.",
            "",
            *rows,
            "",
            "Notes:",
            *notes,
            "",
        ]
    )
    with open(os.path.join(out, "latest.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print()
    print(text)
    missed = [f["figure"] for f in figures if f.get("met") is False]
    if missed:
        print(f"{len(missed)} goal(s) not met: " + "; ".join(missed))


if __name__ == "__main__":
    main()
