"""Where a training job runs: `local` (torchrun processes on this machine) or `kubernetes` (PyTorchJob)."""
