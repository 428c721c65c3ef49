"""Run under `torchrun --nproc_per_node 2`: each rank assigns its slice of a known world batch."""

import sys
import warnings

import torch
import torch.distributed as dist

from immiscible_diffusers import assign_noise


def main(output_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    prototypes = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    world_samples = prototypes[torch.randint(0, 3, (13,), generator=g)] + 0.05 * torch.randn(13, 3, 8, 8, generator=g)
    world_noise = torch.randn(13, 3, 8, 8, generator=g)
    # unequal per-rank batches: 6 on rank 0, 7 on rank 1
    start, end = (0, 6) if rank == 0 else (6, 13)
    results = {
        scope: assign_noise(world_samples[start:end], world_noise[start:end], scope=scope)
        for scope in ("global", "local")
    }
    # Above block_size: 4 blocks of 4, 3, 3, 3 rows (two straddle the ranks), solved by ranks 0, 1, 0, 1.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results["global_blocks"] = assign_noise(
            world_samples[start:end], world_noise[start:end], scope="global", block_size=4
        )
    results["block_warnings"] = len(caught)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(
            {
                "global": torch.cat([r["global"] for r in gathered]),
                "local": torch.cat([r["local"] for r in gathered]),
                "global_blocks": torch.cat([r["global_blocks"] for r in gathered]),
                "block_warnings": [r["block_warnings"] for r in gathered],
                "samples": world_samples,
                "noise": world_noise,
            },
            output_path,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
