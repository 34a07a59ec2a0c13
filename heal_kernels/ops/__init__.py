"""torch.library custom ops, autograd and device dispatch for every heal_kernels op."""
