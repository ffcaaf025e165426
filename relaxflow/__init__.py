"""RelaxFlow, the fast path: training-free dual-branch sampling for TRELLIS-style generators."""
