"""python -m bench [--quick] [--only SECTION ...] [--output docs/benchmarks.md] [--chart docs/benchmarks.png]"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.report import chart, markdown, targets
from bench.suite import ROOT, SECTIONS, Sizes, run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench", description="streamgroup benchmarks (issue 5)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run each (smoke test)")
    parser.add_argument("--only", action="append", choices=list(SECTIONS), help="run only this section (repeatable)")
    parser.add_argument("--messages", type=int, help="messages for the consumer and producer throughput runs")
    parser.add_argument("--runs", type=int, help="runs per fast approach (the median is reported)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md", help="markdown to write")
    parser.add_argument("--chart", type=Path, default=None, help="PNG chart (default: next to --output)")
    parser.add_argument("--no-chart", action="store_true", help="write no chart (needs no matplotlib)")
    parser.add_argument("--json", type=Path, help="also write the raw results as JSON")
    args = parser.parse_args(argv)

    sizes = Sizes.quick() if args.quick else Sizes()
    if args.messages:
        sizes.messages = args.messages
    if args.runs:
        sizes.runs = args.runs
    sections = args.only or list(SECTIONS)
    chart_path = None if args.no_chart else (args.chart or args.output.with_suffix(".png"))

    started = time.monotonic()
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory(prefix="streamgroup-bench-") as workdir:
        report = run(sections, sizes, Path(workdir))
    elapsed = time.monotonic() - started

    print(f"\n== targets (run took {elapsed:.0f} s)")
    found = targets(report)
    for target in found:
        print(target.line())
    command = shlex.join(["python", "-m", "bench", *argv])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if chart_path is not None:
        chart(report, chart_path)
    chart_name = None
    if chart_path is not None and chart_path.exists():
        chart_name = chart_path.name if chart_path.parent.resolve() == args.output.parent.resolve() else str(chart_path)
    args.output.write_text(markdown(report, command, date, chart_name))
    print(f"wrote {args.output}" + (f" and {chart_path}" if chart_name else ""))
    if args.json:
        data = report.to_json() | {"targets": [t.__dict__ | {"passed": t.passed} for t in found]}
        args.json.write_text(json.dumps(data, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
