"""Seconds per GNDIImportance scoring pass of torch-pruning test_pruner_TransposeConv's model, as
scripts/tp_suite.py substitutes it (one random batch of example_inputs' shape, default settings).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/tp_transpose_pass.py [PASSES]
"""
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from fxgndi.pruning.importance import GNDIImportance


class TransposeModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.ConvTranspose2d(16, 64, 2, stride=2)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 8, 3, 1, 1)
        self.bn3 = nn.BatchNorm2d(8)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.relu(self.bn3(self.conv3(x)))


torch.manual_seed(0)
model = TransposeModel()
ex = torch.randn(1, 3, 224, 224)
print("output", tuple(model(ex).shape))
imp = GNDIImportance([torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))])
dg = tp.DependencyGraph().build_dependency(model, example_inputs=ex)
groups = list(dg.get_all_groups(root_module_types=[nn.Conv2d, nn.ConvTranspose2d]))
for trial in range(int(sys.argv[1]) if len(sys.argv) > 1 else 1):
    imp.clear()
    t = time.perf_counter()
    for g in groups:
        imp(g)
    print(f"pass {trial}: {time.perf_counter() - t:.1f} s wall for {len(groups)} groups, "
          f"imp.seconds {imp.seconds:.1f}, mode {imp.chosen_mode}, plan {imp.plan}", flush=True)
