import os

import torch

# No test may reach the network: the Hub client is pointed at local fixtures where a test needs it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: thread start-up costs more than it saves, and one thread keeps reductions deterministic.
torch.set_num_threads(1)

from hub_server import hub_server, hub_server_session  # noqa: E402,F401  (pytest fixtures)
