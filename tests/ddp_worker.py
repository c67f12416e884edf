"""Helper for tests/test_model.py::test_ddp_gradients_match_one_process: the gradients of one training step.

    python tests/ddp_worker.py OUT.pt                                                          # one process
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUT.pt  # 2 ranks, gloo

Every rank builds the same tiny model (seed 0) and the same batch with uneven loss masks, and takes its own
rows. The summed token loss is divided by the GLOBAL token count (all_reduce_sum) and multiplied by the world
size, because DDP averages gradients over ranks: the result is then the gradient of one process's
loss / count on the whole batch. Rank 0 writes {parameter name: gradient} to OUT.pt."""
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C
import model as M  # noqa: E402


def main():
    rank, world, device = C.setup_ddp("cpu")
    torch.manual_seed(0)
    net = M.build_model("tiny", C.get_tokenizer("byte"), n_layer=2, d_model=64, d_ff=128, max_seq_len=64)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (4, 16), generator=g)  # (B, T), the same batch on every rank
    mask = (torch.rand(4, 16, generator=g) < torch.tensor([[0.9], [0.3], [0.6], [0.5]])).long()  # uneven counts
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    if world > 1:
        net = DDP(net)
    nll = -M.token_logprobs(net(ids[rows]), ids[rows], mask[rows]).sum()
    count = C.all_reduce_sum(mask[rows, 1:].sum().float())  # position 0 is never a target
    (nll / count * world).backward()
    if rank == 0:
        raw = getattr(net, "module", net)
        torch.save({n: p.grad for n, p in raw.named_parameters()}, sys.argv[1])


if __name__ == "__main__":
    C.run(main)
