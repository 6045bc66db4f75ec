"""Train a tiny two-tower model with DistributedDataParallel and flashcl.ClipLoss, on CPUs (gloo):

    torchrun --nproc_per_node=2 examples/ddp_clip.py --steps 50

Each rank draws its own batch of paired "image" and "text" vectors (the text a fixed linear map of
the image plus noise), embeds them with its replica of the model and calls flashcl.ClipLoss with
world_size > 1, as open_clip's training loop does: every rank's images are contrasted with every
rank's texts, without the global logits matrix, and DDP averages the gradients. Rank 0 prints the
global loss and retrieval accuracy as it falls. On GPUs, use the nccl backend and CUDA tensors.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import flashcl


class TwoTowers(nn.Module):
    def __init__(self, image_dim=32, text_dim=24, embedding=16):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(image_dim, 64), nn.ReLU(), nn.Linear(64, embedding))
        self.text = nn.Sequential(nn.Linear(text_dim, 64), nn.ReLU(), nn.Linear(64, embedding))
        self.logit_scale = nn.Parameter(torch.tensor(2.3))  # log(10), as open_clip stores it

    def forward(self, images, texts):
        return F.normalize(self.image(images), dim=1), F.normalize(self.text(texts), dim=1), self.logit_scale.exp()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64, help="pairs per rank and step")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model on every rank
    model = DistributedDataParallel(TwoTowers())
    mapping = torch.randn(32, 24, generator=torch.Generator().manual_seed(1)) / 32**0.5
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = flashcl.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    for step in range(args.steps):
        images = torch.randn(args.batch, 32, generator=data)
        texts = images @ mapping + 0.3 * torch.randn(args.batch, 24, generator=data)
        image_emb, text_emb, scale = model(images, texts)
        loss = loss_fn(image_emb, text_emb, scale)  # world_size x this rank's share of the global loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        global_loss /= world_size  # DDP's average over ranks: the loss of the global batch
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            with torch.no_grad():
                accuracy = (image_emb @ text_emb.T).argmax(1).eq(torch.arange(args.batch)).float().mean()
            print(f"step {step:4d}  global loss {global_loss.item():.4f}  local image->text top-1 {accuracy:.2f}",
                  flush=True)
    replicas = [torch.zeros(1) for _ in range(world_size)]
    dist.all_gather(replicas, sum(p.sum() for p in model.parameters()).detach().reshape(1))
    if rank == 0:
        assert all(torch.equal(r, replicas[0]) for r in replicas), "DDP replicas diverged"
        print(f"done: {world_size} ranks x {args.batch} pairs, replicas identical")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
