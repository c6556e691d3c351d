"""The multi-process test helper itself: results come back in rank order, a rank's exception is re-raised."""
from __future__ import annotations

import pytest
from dist_utils import DistributedTestError, run_distributed

pytestmark = pytest.mark.distributed


def _rank_and_sum() -> tuple[int, float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), float(t)


def _fail_on_rank_1() -> int:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    return 0


def test_results_come_back_in_rank_order():
    assert run_distributed(_rank_and_sum, world_size=2, timeout=60) == [(0, 3.0), (1, 3.0)]


def test_a_rank_exception_is_reraised_with_its_traceback():
    with pytest.raises(DistributedTestError, match="rank 1 raised") as info:
        run_distributed(_fail_on_rank_1, world_size=2, timeout=60)
    assert "ValueError: boom on rank 1" in str(info.value)
