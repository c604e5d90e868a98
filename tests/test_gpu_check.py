"""tools/gpu_check.py: the dry run (every step's code at toy size on CPU) and the driver's bookkeeping.

No figure is checked here (the GPU run's are the point of the tool); what is: every step and run is
recorded, with its status and seconds, in gpu_check.md and gpu_check.json, as the run goes, and a run
stopped at its limit or skipped for lack of budget is recorded as such with what it wrote before."""

import json
import sys

import pytest

from tests.conftest import REPO, run_python, subprocess_env

STEPS = ["claim", "planner", "gpu_tests", "throughput", "load_speed"]


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(REPO / "tools"))
    import gpu_check

    return gpu_check


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = run_python(str(REPO / "tools/gpu_check.py"), "--dry-run", "--output-dir", str(out),
                      env=subprocess_env(out / "cache"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_every_step_and_run_is_recorded_with_status_and_time(dry_run):
    out, report, markdown = dry_run
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    assert report["meta"]["dry_run"] and "--dry-run" in report["meta"]["command"] and report["meta"]["date"]
    assert [step["name"] for step in report["steps"]] == STEPS
    for step in report["steps"]:
        assert step["status"] == "pass" and step["seconds"] > 0 and step["runs"], step
        assert f"## {step['name']}: " in markdown
        for run in step["runs"]:
            assert run["status"] == "pass" and run["seconds"] > 0 and run["timeout_s"] > 0 and run["records"], run
            assert f"- {run['label']}: **pass** (" in markdown
    assert markdown.count("**pass** in ") == len(STEPS)


def test_each_step_leaves_its_figures(dry_run):
    _, report, markdown = dry_run
    steps = {step["name"]: step for step in report["steps"]}
    records = {name: [r for run in step["runs"] for r in run["records"]] for name, step in steps.items()}
    planner = [r for r in records["planner"] if r.get("table") == "planner"]
    assert len(planner) == 6 and all(r["predicted"] > 0 and r["measured"] > 0 for r in planner)
    assert any("MoE" in r["row"]["config"] for r in planner) and any("offload" in r["row"]["config"] for r in planner)
    claim = [r for r in records["claim"] if r.get("table") == "claim"]
    assert len(claim) == 3 and all(r["ok"] and len(r["losses"]) == 3 for r in claim)
    assert sum("emulated 2 of 4 layers" in r.get("note", "") for r in records["claim"]) == 3
    rates = {r["variant"]: r["tokens_per_sec"] for r in records["throughput"] if "variant" in r}
    assert set(rates) == {"ours", "peer"} and all(v > 0 for v in rates.values())
    assert any(note.startswith("ours / peer tokens/s: ") for note in steps["throughput"]["notes"])
    assert {r["kind"] for r in records["load_speed"] if "kind" in r} == {"draw", "quantize", "h2d", "read"}
    assert any(r.get("bound_s", 0) > 0 for r in records["load_speed"])
    assert "SKIPPED (needs a CUDA device)" in markdown  # the gpu tests were collected and skipped on CPU
    assert "| config | batch x context | predicted GiB | measured GiB | error | within 10% |" in markdown


def test_a_run_stopped_at_its_limit_keeps_what_it_wrote(gpu_check, tmp_path):
    """The whole process group is killed at the limit; the output so far is kept."""
    code, output, _ = gpu_check.run_subprocess(
        [sys.executable, "-c", "import subprocess, sys, time; print('figure', flush=True); "
                               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
                               "time.sleep(600)"], 3, subprocess_env())
    assert code is None and "figure" in output
    assert gpu_check.run_status(None, [{"ok": True}], "claim", dry=False) == "timeout"
    assert gpu_check.run_status(0, [{"ok": True}, {"ok": False}], "claim", dry=False) == "fail"
    assert gpu_check.run_status(1, [{"ok": True}], "planner", dry=False) == "error"
    assert gpu_check.run_status(0, [{"note": "all skipped"}], "pytest", dry=False) == "fail"  # must run on a GPU


def test_runs_past_the_budget_are_skipped_and_recorded(gpu_check, tmp_path):
    report = gpu_check.Report(tmp_path / "out", gpu_check.environment(True, 0, ["--dry-run"]))
    steps = gpu_check.plan_steps(dry=True)
    gpu_check.run_steps(steps, 0, tmp_path, True, report)
    saved = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [step["status"] for step in saved["steps"]] == ["skipped"] * len(steps)
    assert all(run["status"] == "skipped" for step in saved["steps"] for run in step["runs"])
    assert (tmp_path / "out" / "gpu_check.md").read_text().count("**skipped** in ") == len(steps)


@pytest.mark.parametrize("args,needle", [(["--steps", "claim,nope"], "unknown nope"),
                                         ([], "no CUDA device: run with --dry-run")])
def test_bad_arguments_fail_in_one_line(tmp_path, args, needle):
    import torch

    if not args and torch.cuda.is_available():
        pytest.skip("a GPU is present: the real run would start")
    proc = run_python(str(REPO / "tools/gpu_check.py"), "--output-dir", str(tmp_path / "out"), *args, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / "out").exists()
