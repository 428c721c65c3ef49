"""scope="global" under a real 2-process torch.distributed group (gloo, CPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from immiscible_diffusers import assign_noise


@pytest.mark.slow
def test_global_scope_equals_single_process_assignment_of_the_world_batch(tmp_path):
    output = tmp_path / "result.pt"
    worker = Path(__file__).with_name("distributed_assignment_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), str(output)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = torch.load(output)
    samples, noise = result["samples"], result["noise"]

    assert torch.equal(result["global"], assign_noise(samples, noise))
    # local scope: each rank's slice assigned on its own, noise never crosses ranks
    local = torch.cat([assign_noise(samples[:6], noise[:6]), assign_noise(samples[6:], noise[6:])])
    assert torch.equal(result["local"], local)
    assert not torch.equal(result["global"], result["local"]), "the world batch should pair across ranks here"

    # Blocks solved in parallel across the ranks equal the one-process blockwise assignment.
    with pytest.warns(UserWarning, match="4 blocks"):
        blockwise = assign_noise(samples, noise, block_size=4)
    assert torch.equal(result["global_blocks"], blockwise)
    assert not torch.equal(result["global_blocks"], result["global"]), "blocks should pair differently here"
    assert result["block_warnings"] == [1, 1]  # every rank says the batch was split
