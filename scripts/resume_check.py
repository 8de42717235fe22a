"""Stop a CLI pretraining at step N (Ctrl-C, SIGTERM, SIGKILL), resume it, and compare with an uninterrupted run.

    python scripts/resume_check.py --out /tmp/resume-check            # tiny, 3D, ROI 64, 25 steps, stop at 20

Four runs of ``napari-dagman pretrain`` with the same seed: ``straight`` (uninterrupted); ``interrupted``
(Ctrl-C, i.e. SIGINT, as soon as step N is logged) and ``terminated`` (SIGTERM, what a batch scheduler sends
first): the CLI finishes the step it is in, saves and exits, then ``--resume``; ``killed`` (SIGKILL as soon as
step N is logged: nothing is saved at the kill, ``--resume`` continues from the last periodic save). It prints
the step each resumed run restarted at and the largest loss difference to the straight run over every step.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pretrain_cmd(args: argparse.Namespace, out: Path, *, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "napari_dagman.cli", "pretrain"]
    if resume:
        return [*cmd, "--out", str(out), "--resume", "--quiet"]
    return [
        *cmd,
        args.ct,
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--roi",
        str(args.roi),
        "--steps",
        str(args.steps),
        "--save-every",
        str(args.save_every),
        "--seed",
        "0",
        "--quiet",
    ]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {int(r["step"]): float(r["loss"]) for r in rows if "loss" in r}


def run_until(args: argparse.Namespace, out: Path, sig: signal.Signals) -> None:
    """Start a run and send ``sig`` once step ``args.stop_at`` is in its metrics."""
    # as from a terminal: started from a background script, a child would inherit SIGINT ignored
    proc = subprocess.Popen(
        pretrain_cmd(args, out), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    )
    metrics = out / "metrics.jsonl"
    while proc.poll() is None:
        if metrics.exists() and args.stop_at in losses(out):
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    proc.wait()


def resumed_at(run: Path) -> list[int]:
    return json.loads((run / "run.json").read_text()).get("resumed_at", [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ct", default=str(REPO.parent / "shared" / "data" / "example_ct.nii.gz"))
    p.add_argument("--out", required=True)
    p.add_argument("--roi", type=int, default=64)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--stop-at", type=int, default=20)
    p.add_argument("--save-every", type=int, default=5)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    straight = out / "straight"
    subprocess.run(pretrain_cmd(args, straight), check=True)
    reference = losses(straight)
    stops = (("interrupted", signal.SIGINT), ("terminated", signal.SIGTERM), ("killed", signal.SIGKILL))
    for name, sig in stops:
        run = out / name
        run_until(args, run, sig)
        logged = max(losses(run))
        subprocess.run(pretrain_cmd(args, run, resume=True), check=True)
        got = losses(run)
        diff = max(abs(got[k] - reference[k]) for k in reference)
        print(
            f"{name}: stopped by {sig.name} after step {logged} was logged; resumed at step(s) {resumed_at(run)}; "
            f"{len(got)} steps logged; max |loss - uninterrupted| over steps 1-{args.steps}: {diff:.3g}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
