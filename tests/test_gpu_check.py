"""`scripts/gpu_check.sh quick`, the first thing to run on a GPU, checked for its plumbing on a CPU:
every step runs under its own timeout and is recorded (ok / failed / timeout), a step that fails
or hangs does not stop the others, and the three result files land in $OUT."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_check_runs_every_step_and_writes_three_files(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, QLA_GPU_CHECK_SKIP_INSTALL="1",
               QLA_GPU_CHECK_TIMEOUT="8")
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "quick"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]  # no GPU here: steps fail
    assert sorted(path.name for path in out.iterdir()) == ["logs.tar.gz", "results.json", "summary.md"]
    results = json.loads((out / "results.json").read_text())
    steps = {step["name"]: step for step in results["steps"]}
    assert list(steps) == ["backends", "kernels", "rotation", "gemm", "e2e", "launches"]
    assert steps["backends"]["status"] == "ok"
    assert steps["gemm"]["status"] in ("failed", "timeout")  # bench_gemm needs CUDA
    assert all(step["limit"] == 8 and step["seconds"] <= step["limit"] + 12 for step in steps.values())
    assert any(step["status"] == "timeout" for step in steps.values())  # the interpreter's op tests take longer
    assert steps["launches"]["status"] == "ok" and steps["launches"]["launches"] == {"logged": 0, "outside_table": 0}
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# gpu_check quick:") and all(f"| {name} |" in summary for name in steps)
    with tarfile.open(out / "logs.tar.gz") as archive:
        names = set(archive.getnames())
    assert {f"logs/{name}.log" for name in steps} <= names and "logs/steps.tsv" in names
