"""Two real CPU processes under torchrun (gloo): DDP keeps replicas identical and metrics agree."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_two_processes_agree(tmp_path):
    worker = Path(__file__).with_name("_ddp_worker.py")
    # --standalone: a rendezvous on a free local port, so no fixed port can collide with another run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    # the workers' own lines (the cause), not torchrun's summary of the failure that follows them
    workers_said = "\n".join(line for line in result.stderr.splitlines()
                             if "torch/distributed/elastic" not in line)[:3000]
    assert result.returncode == 0, workers_said
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9, abs=1e-9)
    assert ranks[0]["accuracy"] == ranks[1]["accuracy"]
    assert ranks[0]["accuracy"] > 80.0
