"""Host-side planner: page table -> balanced work tiles over persistent CTAs (no torch.cuda)."""
