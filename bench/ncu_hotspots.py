"""The SASS instructions where a kernel's warps stall most, from an Nsight Compute report.

`ncu --section SourceCounters` samples each warp's program counter and stall reason; the "details"
page sums them per kernel but names no instruction. This reads the report's source page as CSV
(`ncu -i REPORT --page source --csv --print-source sass`, one table per profiled kernel) and prints,
per kernel, its instructions ranked by stall samples with the reasons that hold them, so a kernel's
time can be charged to its loads, barriers or math before any rewrite.

    python3 bench/ncu_hotspots.py $OUT/ncu19/probe.ncu-rep --top 20
    python3 bench/ncu_hotspots.py $OUT/ncu28/probe.ncu-rep --opcodes   # where the instructions go

`--opcodes` ranks SASS opcodes by warp instructions executed instead (the source page's
"Instructions Executed" column): for a kernel bound by its own instruction stream (the short fused
attention, session 19), that says which work to cut before any rewrite.

Runs where ncu does (the GPU machine); the parsing (`hotspots`) takes the CSV text and is tested
on the CPU.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def _table_rows(lines: list[str], i: int, header: list[str]) -> tuple[list[list[str]], int]:
    """The rows of the table whose header is `header`, from line `i` to the first line that does not fit it;
    returns them and the index of that line."""
    body = []
    while i < len(lines):
        cells = next(csv.reader([lines[i]]), [])
        if len(cells) != len(header):
            break
        body.append(cells)
        i += 1
    return body, i


def hotspots(csv_text: str, top: int = 20) -> list[str]:
    """Report lines for every table of instructions in `csv_text`: a header line naming the
    kernel (the line ncu prints before its table, if any), then the `top` instructions by the
    "Warp Stall Sampling (All Samples)" column, each with its share of the kernel's samples, its
    SASS and its largest stall-reason columns."""
    lines = csv_text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        row = next(csv.reader([lines[i]]), [])
        stall_col = next((c for c, name in enumerate(row) if name.startswith("Warp Stall Sampling (All")), None)
        if stall_col is None:
            i += 1
            continue
        header, title = row, next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "kernel")
        body, i = _table_rows(lines, i + 1, header)
        total = sum(_number(r[stall_col]) for r in body) or 1.0
        source_col = next((c for c, name in enumerate(header) if name in ("Source", "# Source")), 1)
        reasons = [c for c, name in enumerate(header) if name.startswith("stall_") or name.startswith("Stall")]
        out.append(f"== {title.strip()[:120]}: {len(body)} instructions, {int(total)} stall samples")
        for r in sorted(body, key=lambda r: -_number(r[stall_col]))[:top]:
            samples = _number(r[stall_col])
            if not samples:
                break
            why = sorted(((_number(r[c]), header[c]) for c in reasons if _number(r[c])), reverse=True)[:3]
            why_text = ", ".join(f"{name} {int(n)}" for n, name in why)
            out.append(f"  {100 * samples / total:5.1f}%  {r[source_col].strip()[:70]:70s}  {why_text}")
    return out


def opcode_mix(csv_text: str, top: int = 20) -> list[str]:
    """Report lines for every table of instructions in `csv_text`: a header line naming the kernel,
    its warp instructions executed in all, then the `top` SASS opcodes (predicate and modifiers
    dropped: `@P0 LDG.E.128` counts as LDG) by their share of them."""
    lines = csv_text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        row = next(csv.reader([lines[i]]), [])
        exec_col = next((c for c, name in enumerate(row) if name.strip() == "Instructions Executed"), None)
        if exec_col is None:
            i += 1
            continue
        header, title = row, next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "kernel")
        body, i = _table_rows(lines, i + 1, header)
        source_col = next((c for c, name in enumerate(header) if name in ("Source", "# Source")), 1)
        counts: dict[str, float] = {}
        for r in body:
            words = [w for w in r[source_col].split() if not w.startswith("@")]
            if words:
                op = words[0].split(".")[0]
                counts[op] = counts.get(op, 0.0) + _number(r[exec_col])
        total = sum(counts.values()) or 1.0
        out.append(f"== {title.strip()[:120]}: {int(total)} warp instructions executed")
        for op, n in sorted(counts.items(), key=lambda kv: -kv[1])[:top]:
            out.append(f"  {100 * n / total:5.1f}%  {op:12s} {int(n)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", help="an .ncu-rep with the SourceCounters section")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--opcodes", action="store_true", help="rank opcodes by instructions executed")
    args = ap.parse_args()
    done = subprocess.run(["ncu", "-i", args.report, "--page", "source", "--csv", "--print-source", "sass"],
                          capture_output=True, text=True)
    lines = (opcode_mix if args.opcodes else hotspots)(done.stdout, args.top)
    if not lines:  # an ncu whose source page reads otherwise: show what it printed
        print(done.stderr[-2000:], file=sys.stderr)
        print("\n".join(done.stdout.splitlines()[:60]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
