"""2D diffusion and flow-model guidance behind one interface. Knows nothing of 3D."""
