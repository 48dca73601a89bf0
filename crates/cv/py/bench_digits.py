"""PyTorch's side of the digits benchmark: the same network, initialization scheme, optimizer,
schedule, batch size, epochs, thread count and split as benches/digits.rs; prints one JSON
object. Usage: bench_digits.py DATA_DIR SPLIT_JSON THREADS"""
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

data, split_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(3)
split = json.load(open(split_path))


def load(items):
    xs = np.stack([np.asarray(Image.open(f"{data}/digits/images/{it['name']}"), dtype=np.float32) / 255.0 for it in items])
    ys = np.array([int(it["label"]) for it in items])
    return torch.from_numpy(xs).unsqueeze(1), torch.from_numpy(ys)


train_x, train_y = load(split["train"])
test_x, test_y = load(split["test"])
width, epochs, batch = 32, 12, 32
model = torch.nn.Sequential(
    torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.ReLU(),
    torch.nn.Conv2d(width, 2 * width, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    torch.nn.Flatten(), torch.nn.Linear(2 * width * 16, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10),
)
opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.999), eps=1e-8)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
gen = torch.Generator().manual_seed(3)
epoch_seconds = []
for epoch in range(epochs):
    model.train()
    start = time.perf_counter()
    order = torch.randperm(len(train_y), generator=gen)
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        loss = F.cross_entropy(model(train_x.index_select(0, idx)), train_y.index_select(0, idx))
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()  # as our trainer reads each step's loss for its progress line
    epoch_seconds.append(time.perf_counter() - start)
    sched.step()
model.eval()
with torch.no_grad():
    accuracy = (model(test_x).argmax(-1) == test_y).float().mean().item()


def throughput(per_call, seconds, run):
    """Best of five rounds, as benches/digits.rs measures."""
    for _ in range(20):
        run()
    best = 0.0
    for _ in range(5):
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < seconds / 5:
            run()
            calls += 1
        best = max(best, calls * per_call / (time.perf_counter() - start))
    return best


singles = [test_x[i:i + 1] for i in range(len(test_x))]
batches = [b for b in torch.split(test_x, 64) if len(b) == 64]
state = {"i": 0, "j": 0}


def one():
    with torch.no_grad():
        model(singles[state["i"] % len(singles)])
    state["i"] += 1


def sixty_four():
    with torch.no_grad():
        model(batches[state["j"] % len(batches)])
    state["j"] += 1


print(json.dumps({
    "side": "pytorch", "version": torch.__version__, "threads": threads, "epochs": epochs, "batch_size": batch,
    "train_images": len(train_y), "test_images": len(test_y), "test_accuracy": accuracy,
    "epoch_seconds": epoch_seconds,
    "infer_images_per_s_batch1": throughput(1, 3.0, one), "infer_images_per_s_batch64": throughput(64, 3.0, sixty_four),
}))
