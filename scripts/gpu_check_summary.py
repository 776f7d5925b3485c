"""Summary of `scripts/gpu_check.sh quick`: summary.md (what a person reads first) and results.json
(everything parsed) from the step logs.

    python scripts/gpu_check_summary.py LOGS OUT SECONDS

LOGS holds steps.tsv (name, status, exit code, seconds, limit per step), one NAME.log per step and
the benchmarks' JSON files; OUT receives summary.md and results.json. Exits 1 if any step did not
pass, 0 otherwise.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional


def read_steps(logs: Path) -> List[Dict[str, object]]:
    steps = []
    for line in (logs / "steps.tsv").read_text().splitlines():
        if line.strip():
            name, status, code, seconds, limit = line.split("\t")
            steps.append({"name": name, "status": status, "exit_code": int(code), "seconds": int(seconds),
                          "limit": int(limit)})
    return steps


def pytest_counts(log: str) -> Optional[Dict[str, int]]:
    """Counts from pytest's last summary line ("3 failed, 120 passed, 4 skipped in 9.1s")."""
    lines = [line for line in log.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    if not lines:
        return None
    return {kind: int(count) for count, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)", lines[-1])}


def failed_tests(log: str) -> List[str]:
    return re.findall(r"^FAILED (\S+)", log, flags=re.MULTILINE)[:30]


def newest(logs: Path, pattern: str) -> Optional[dict]:
    files = sorted(logs.glob(pattern))
    return json.loads(files[-1].read_text()) if files else None


def gemm_table(report: dict) -> List[str]:
    lines = ["| shape | config | cuBLAS fp16 ms | ours (full epilogue) ms | speedup | _int_mm + eager ms |",
             "|---|---|---|---|---|---|"]
    for row in report.get("rows", []):
        base, int_mm = row.get("cublas_fp16_ms"), row.get("int_mm_eager_full_ms")
        for key, ours in row.items():
            if not key.endswith("_full_ms") or key == "int_mm_eager_full_ms":
                continue
            config = key[:-len("_full_ms")]
            lines.append(f"| {row.get('model')} {row.get('layer')} (M={row.get('M')}) | {config} | {_ms(base)} | "
                         f"{_ms(ours)} | {_ratio(base, ours)} | {_ms(int_mm)} |")
    return lines


def e2e_lines(report: dict) -> List[str]:
    lines = ["| model | batch | variant | ms | vs fp16 eager | vs fp16 compiled | correction overhead |",
             "|---|---|---|---|---|---|---|"]
    for row in report.get("rows", []):
        overhead = row.get("correction_overhead")
        lines.append(f"| {row.get('model')} | {row.get('batch')} | {row.get('variant')} | {_ms(row.get('ms'))} | "
                     f"{_times(row.get('speedup_vs_fp16_eager'))} | {_times(row.get('speedup_vs_fp16_compile'))} | "
                     f"{'' if overhead is None else f'{100 * overhead:+.1f}%'} |")
    for row in report.get("decode", []):
        lines.append(f"| {row.get('model')} decode | {row.get('batch')} | {row.get('variant')} | "
                     f"{_ms(row.get('ms_per_step'))} | {_times(row.get('speedup_vs_fp'))} (vs bf16) | | |")
    return lines


def _ms(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _times(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _ratio(base, ours) -> str:
    return "–" if not base or not ours else f"{base / ours:.2f}×"


def main(argv: List[str]) -> int:
    logs, out, seconds = Path(argv[0]), Path(argv[1]), int(argv[2])
    steps = read_steps(logs)
    results: Dict[str, object] = {"seconds": seconds, "steps": steps}
    device = (logs / "nvidia-smi.txt").read_text() if (logs / "nvidia-smi.txt").exists() else ""
    gpu = re.search(r"\|\s+\d+\s+(NVIDIA [^|]+?)\s{2,}", device)
    results["device"] = gpu.group(1).strip() if gpu else "no GPU found by nvidia-smi"
    for step in steps:
        log_path = logs / f"{step['name']}.log"
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        step["tail"] = log.splitlines()[-5:]
        counts = pytest_counts(log) if step["name"] == "kernels" else None
        if counts is not None:
            step["pytest"] = counts
            step["failed_tests"] = failed_tests(log)
        if step["name"] == "launches":
            match = re.search(r"(\d+) distinct launches logged.*?(\d+) outside the table", log)
            if match:
                step["launches"] = {"logged": int(match.group(1)), "outside_table": int(match.group(2))}
    gemm = newest(logs, "gemm_*.json")
    e2e = newest(logs, "e2e_*.json")
    rotation = newest(logs, "rotation_gpu_*.json")
    results["gemm"], results["e2e"], results["rotation"] = gemm, e2e, rotation
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")

    lines = [f"# gpu_check quick: {results['device']}", "",
             f"{sum(s['status'] == 'ok' for s in steps)} of {len(steps)} steps passed in {seconds} s.", "",
             "| step | status | seconds (limit) | detail |", "|---|---|---|---|"]
    for step in steps:
        detail = ""
        if "pytest" in step:
            detail = ", ".join(f"{count} {kind}" for kind, count in step["pytest"].items())
        elif "launches" in step:
            detail = f"{step['launches']['outside_table']} of {step['launches']['logged']} launches outside the AOT table"
        elif step["status"] != "ok" and step["tail"]:
            detail = step["tail"][-1][:160].replace("|", "/")
        lines.append(f"| {step['name']} | {step['status']} | {step['seconds']} ({step['limit']}) | {detail} |")
    failed = [name for step in steps for name in step.get("failed_tests", [])]
    if failed:
        lines += ["", "Failed tests:", *[f"- `{name}`" for name in failed]]
    if gemm:
        lines += ["", f"## GEMM ({gemm.get('device', '')})", *gemm_table(gemm)]
    if e2e:
        lines += ["", f"## End to end ({e2e.get('device', '')})", *e2e_lines(e2e)]
    if rotation:
        lines += ["", f"## Rotation ({rotation.get('device', '')}, fp16; target <= 3% of the pre-kernel)",
                  "| rows × K → N | in the pre-kernel | in re-quantization | in the W4A4 layer |",
                  "|---|---|---|---|"]
        lines += [f"| {row['m']} × {row['k']} → {row['n']} | {100 * row['rotation_in_pre_kernel']:+.0f}% | "
                  f"{100 * row['rotation_in_requantize']:+.0f}% | {100 * row['rotation_in_layer']:+.0f}% |"
                  for row in rotation["rows"]]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return 0 if steps and all(step["status"] == "ok" for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
