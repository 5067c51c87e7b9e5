"""Run by tests/test_distributed.py under torchrun: train with DDP, write what this rank sees."""

import json
import sys

import torch

from slimkit import distributed
from slimkit.data import load_data
from slimkit.models import create_model
from slimkit.train import evaluate, fit

torch.set_num_threads(1)
out = sys.argv[1]
with distributed.process_group_from_env():
    data = load_data("digits")
    model = create_model("lenet5", num_classes=10, in_channels=1)
    fit(model, data.train, {"epochs": 3, "lr": 0.02, "batch_size": 32}, progress=False)
    accuracy = evaluate(model, data.test)
    checksum = float(sum(p.double().sum() for p in model.parameters()))
    seen = {"rank": distributed.rank(), "world": distributed.world_size(), "accuracy": accuracy,
            "checksum": checksum}
with open(f"{out}/rank{seen['rank']}.json", "w") as handle:
    json.dump(seen, handle)
